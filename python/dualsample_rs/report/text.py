"""The report as aligned plain text, for a terminal (and the HTML page's summary block)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from .accumulate import Histogram
from .summary import MODELS, RATIO_RANGE, RatioStats, Summary

MODEL_NAMES = {"theta": "base θ", "t": "teacher t"}
# what each diagnostic of a step is (src/kernels/logspace.rs), in the order output.py lists them
DIAGNOSTIC_LABELS = {
    "kl_theta": "KL(q*‖π_θ)",
    "kl_t": "KL(q*‖π_t)",
    "ess_theta": "ESS/n, q* draws weighted to π_θ",
    "ess_t": "ESS/n, q* draws weighted to π_t",
    "entropy": "H(q*), nats",
    "js": "JS(π_θ, π_t), nats",
}
# positions shown for the mean α by position: early ones closely, then doubling
SHOWN_POSITIONS = (0, 1, 2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def _num(x: float, digits: int = 3) -> str:
    if isinstance(x, float) and math.isnan(x):
        return "–"
    if isinstance(x, int) or (abs(x) >= 1000 and float(x).is_integer()):
        return f"{int(x):,}"
    return f"{x:.{digits}f}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "–"


def table(rows: Sequence[Sequence[str]], indent: int = 2, left: int = 1) -> list[str]:
    """Rows of cells as lines: the first `left` columns left-aligned (labels), the others
    right-aligned (numbers)."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(len(r) for r in rows))]
    lines = []
    for row in rows:
        cells = [c.ljust(widths[i]) if i < left else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append(" " * indent + "  ".join(cells).rstrip())
    return lines


def _quantiles(h: Histogram, qs: Sequence[float]) -> list[str]:
    out = []
    for q in qs:
        v = h.quantile(q)
        edge = "≤" if v == h.lo and h.below else "≥" if v == h.hi and h.above else ""
        out.append(edge + _num(v))
    return out


def _source(stats: RatioStats) -> str:
    total = stats.exact_tokens + stats.observed_tokens + stats.estimated_tokens
    if total == 0:
        return "served"
    if stats.exact_tokens == total:
        return "exact (--rescore)"
    if stats.estimated_tokens == 0:
        return (
            "served, all observed"
            if stats.exact_tokens == 0
            else f"exact {_pct(stats.exact_tokens, total)}, rest observed"
        )
    parts = [f"{_pct(stats.estimated_tokens, total)} estimated"]
    if stats.exact_tokens:
        parts.insert(0, f"{_pct(stats.exact_tokens, total)} exact")
    return "served, " + ", ".join(parts)


def render(summary: Summary, source: str = "") -> str:
    """The whole report as text lines joined by newlines."""
    s = summary
    out: list[str] = []
    title = f"dualsample report: {source}" if source else "dualsample report"
    out += [title, ""]
    reasons = "   ".join(f"{r} {_num(c)} ({_pct(c, s.records)})" for r, c in s.finish_reasons.most_common())
    lengths = s.lengths
    rows = [
        ["records", f"{_num(s.records)}   finished {_num(s.finished)}   failed {_num(s.failed)}"],
        ["finish", reasons or "–"],
        ["tokens", f"{_num(s.tokens)} in finished records ({_num(s.tokens_all)} in all)"],
        ["length", "   ".join([
            f"mean {_num(lengths.mean, 1)}",
            *(f"p{int(q * 100)} {_num(lengths.quantile(q), 0)}" for q in (0.1, 0.5, 0.9, 0.99)),
            f"max {_num(max(lengths.max, 0))}",
        ])],
    ]  # fmt: skip
    if s.alpha.n:
        a = s.alpha
        qs = _quantiles(a, (0.1, 0.5, 0.9))
        rows.append(["α", f"mean {_num(a.moments.mean)}   std {_num(a.moments.std)}   "
                          f"p10 {qs[0]}   p50 {qs[1]}   p90 {qs[2]}"])  # fmt: skip
        means = s.alpha_by_position.means()
        shown = [p for p in SHOWN_POSITIONS if p < means.size] + ([means.size - 1] if means.size else [])
        shown = sorted(set(shown))
        rows.append(["α by position", "   ".join(f"{p}: {_num(float(means[p]), 2)}" for p in shown)])
        if s.alpha_by_position.beyond:
            rows.append(["", f"({_num(s.alpha_by_position.beyond)} tokens beyond position "
                             f"{s.alpha_by_position.sums.size - 1} not shown by position)"])  # fmt: skip
        rows.append(["fallback", f"{_pct(s.fallback_tokens, s.alpha.n)} of tokens"])
    out += table(rows, indent=0, left=2)

    if s.has_ratios:
        c = _num(s.threshold, 2).rstrip("0").rstrip(".")
        out += ["", f"log ratios log π − log q* per token; weights w = exp(ratio), truncated min(w, {c})"]
        rows = [["", "from", "mean", "std", "p5", "p50", "p95", f"w > {c}"]]
        for m in MODELS:
            st = s.ratios[m]
            h = st.log_ratio
            if h.n == 0:
                continue
            rows.append([MODEL_NAMES[m], _source(st), _num(h.moments.mean), _num(h.moments.std),
                         *_quantiles(h, (0.05, 0.5, 0.95)), _pct(st.truncated, h.n)])  # fmt: skip
        out += table(rows, left=2)
        outside = {MODEL_NAMES[m]: s.ratios[m].log_ratio for m in MODELS}
        notes = [f"{k}: {_num(h.below)} below {RATIO_RANGE[0]:g}, {_num(h.above)} above {RATIO_RANGE[1]:g}"
                 for k, h in outside.items() if h.below or h.above]  # fmt: skip
        if notes:
            out.append("  (outside the histogram: " + "; ".join(notes) + ")")

        out += ["", "effective sample size of the importance weights, as a fraction (Σw)²/(n·Σw²) in (0, 1]"]
        rows = [["", "", "per sequence: mean", "p10", "p50", "all sequences"]]
        for m in MODELS:
            st = s.ratios[m]
            if st.ess.n == 0:
                continue
            for label, h, across in (
                ("plain", st.ess, st.sequence_weights.ess_fraction()),
                (f"min(w, {c})", st.ess_truncated, st.sequence_ess_truncated()),
            ):
                name = MODEL_NAMES[m] if label == "plain" else ""
                rows.append([name, label, _num(h.moments.mean), *_quantiles(h, (0.1, 0.5)), _num(across)])
        out += table(rows, left=2)
        out.append("  (per sequence: over its token weights w = exp(ratio); all sequences: over the sequence")
        out.append("   weights exp(Σ ratio) of every finished record; min(w, C) as verl rollout_is_threshold,")
        out.append("   TRL token_truncate / sequence_truncate and NeMo-RL tis truncate)")

    names = s.diagnostic_names()
    if names:
        n = max(s.diagnostics[k].moments.n for k in names)
        out += ["", f"diagnostics at each step (--diagnostics): each record's mean, over {_num(n)} records"]
        rows = [["", "", "mean", "std", "min", "p50", "max"]]
        for k in names:
            r = s.diagnostics[k]
            vals = r.values()
            p50 = float(sorted(vals)[len(vals) // 2]) if vals.size else math.nan
            mo = r.moments
            label = DIAGNOSTIC_LABELS.get(k, "")
            rows.append([k, label, _num(mo.mean), _num(mo.std), _num(mo.min), _num(p50), _num(mo.max)])
        out += table(rows, left=2)

    if s.speculation is not None:
        sp = s.speculation
        per_round = sp.tokens / sp.rounds if sp.rounds else math.nan
        accepted = sp.drafted / sp.rounds if sp.rounds else math.nan
        out += ["", "speculation"]
        rows = [
            ["rounds", f"{_num(sp.rounds)}   tokens per round {_num(per_round, 2)}   "
                       f"accepted drafts per round {_num(accepted, 2)}   drafted tokens {_pct(sp.drafted, sp.tokens)}"],
            ["accepted", "   ".join(f"{k}: {_pct(int(v), sp.rounds)}"
                                    for k, v in enumerate(sp.accepted_per_round.tolist()) if v)],
        ]  # fmt: skip
        out += table(rows, left=2)
    return "\n".join(out) + "\n"
