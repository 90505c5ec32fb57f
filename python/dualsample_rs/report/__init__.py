"""`dualsample report RECORDS [--html PAGE]`: what a records file holds, before training on it.

Records, tokens, finish reasons and lengths; α (its histogram and its mean by position);
the per-record divergence summaries a run with ``--diagnostics`` kept; per-token log
ratios log π_θ − log q* and log π_t − log q* (exact ones where the run rescored) and the
effective sample size of the importance weights, plain and truncated as trainers
truncate them (see :mod:`dualsample_rs.report.summary` for the definitions and the
sources they follow); speculative acceptance where the run speculated.

The file (JSONL, Parquet, or a directory of either) is streamed in chunks into
fixed-size accumulators, so memory stays flat however many records it holds. The HTML
page needs the ``report`` extra (matplotlib); Parquet input needs pyarrow.

Example:
    >>> from dualsample_rs.report import summarise, render_text
    >>> print(render_text(summarise("samples.jsonl")))  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import sys
from typing import TypeVar

from ..exceptions import InvalidInputError
from .reading import iter_chunks
from .summary import DEFAULT_POSITIONS, DEFAULT_THRESHOLD, Summary
from .text import render as render_text

__all__ = ["Summary", "add_parser", "render_text", "run", "summarise"]

_P = TypeVar("_P", bound=argparse.ArgumentParser)


def summarise(path: str, threshold: float = DEFAULT_THRESHOLD, positions: int = DEFAULT_POSITIONS) -> Summary:
    """Read every record at `path` into a :class:`Summary`.

    Args:
        path: a JSONL or Parquet records file, or a directory of them.
        threshold: C, where importance weights are truncated (min(w, C)); > 0.
        positions: how many positions the mean α by position covers; > 0.

    Raises:
        InvalidInputError: a bad argument, or a record that cannot be read (naming its
            file and line or row).
    """
    if not threshold > 0:
        raise InvalidInputError(f"threshold: must be > 0, got {threshold}")
    if positions < 1:
        raise InvalidInputError(f"positions: must be at least 1, got {positions}")
    summary = Summary(threshold, positions)
    for chunk in iter_chunks(path):
        summary.add(chunk)
    return summary


def add_parser(sub: argparse._SubParsersAction[_P]) -> None:
    """Register ``dualsample report`` (its runner is set as the ``run`` default)."""
    p = sub.add_parser("report", help="summarise a records file: lengths, α, log ratios, weights' ESS, speculation")
    p.add_argument("records", metavar="RECORDS", help="JSONL or Parquet records, or a directory of them")
    p.add_argument("--html", metavar="PAGE", default=None,
                   help="also write a self-contained HTML page with plots (the report extra: matplotlib)")  # fmt: skip
    p.add_argument("--is-threshold", type=float, default=DEFAULT_THRESHOLD, metavar="C",
                   help="importance weights truncated to min(w, C), as verl's rollout_is_threshold")  # fmt: skip
    p.add_argument("--positions", type=int, default=DEFAULT_POSITIONS,
                   help="positions the mean α by position covers (default %(default)s)")  # fmt: skip
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the report of ``args.records``; write ``args.html`` when given. 0 on success."""
    if args.html is not None:
        from .page import check_available

        check_available()  # before reading a large file, not after
    summary = summarise(args.records, threshold=args.is_threshold, positions=args.positions)
    text = render_text(summary, args.records)
    sys.stdout.write(text)
    if args.html is not None:
        from .page import render_html

        page = render_html(summary, text, args.records)
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(page)
        print(f"wrote {args.html}", file=sys.stderr)
    return 0
