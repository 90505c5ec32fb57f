"""The report as one self-contained HTML page: the text summary and the plots as inline SVG.

Nothing on the page is fetched: matplotlib draws every plot to SVG with its glyphs as
paths (no font files), inlined in the page, with no script and no stylesheet link. Each
plot is a ``<figure class="plot">`` with an ``id``, so a browser test can find each.
"""

from __future__ import annotations

import html
import io
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from ..exceptions import InvalidInputError
from .summary import MODELS, RATIO_BINS, Summary
from .text import DIAGNOSTIC_LABELS, MODEL_NAMES

COLOURS = {"theta": "#1f77b4", "t": "#d62728"}
FIGSIZE = (9.0, 3.2)


def check_available() -> None:
    """Raise InvalidInputError naming ``--html`` when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidInputError("--html: needs matplotlib (pip install 'dualsample_rs[report]')") from None


def _svg(draw: Callable[[Any], None], nrows: int = 1, ncols: int = 1, size: tuple[float, float] = FIGSIZE) -> str:
    """One figure drawn by `draw(axes)` as SVG text (no XML prologue)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    # a fixed hash salt and no date, so the same file gives the same page
    with matplotlib.rc_context({"svg.hashsalt": "dualsample", "svg.fonttype": "path", "font.size": 9}):
        fig = Figure(figsize=size, layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        draw(axes)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _bars(ax: Any, edges: np.ndarray, counts: np.ndarray, **kwargs: Any) -> None:
    ax.stairs(counts, edges, fill=kwargs.pop("fill", True), **kwargs)


def _lengths(s: Summary) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        ax = axes[0, 0]
        counts = s.lengths.counts[: max(s.lengths.max, 0) + 1]
        # at most 100 bars: lengths grouped into equal ranges
        group = max(1, math.ceil(counts.size / 100))
        padded = np.pad(counts, (0, (-counts.size) % group)).reshape(-1, group).sum(axis=1)
        _bars(ax, np.arange(padded.size + 1) * group, padded, color="#4c72b0")
        ax.set_xlabel("tokens per finished record")
        ax.set_ylabel("records")
        ax.set_title("lengths")
        reasons = axes[0, 1]
        names = [r for r, _ in s.finish_reasons.most_common()]
        reasons.bar(names, [s.finish_reasons[r] for r in names], color="#8172b2")
        reasons.set_title("finish reasons")
        reasons.set_ylabel("records")

    return draw


def _alpha(s: Summary) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        ax = axes[0, 0]
        _bars(ax, s.alpha.edges, s.alpha.counts, color="#55a868")
        ax.set_xlabel("α (weight on the teacher)")
        ax.set_ylabel("tokens")
        ax.set_title("α histogram")
        by = axes[0, 1]
        means = s.alpha_by_position.means()
        by.plot(np.arange(means.size), means, color="#55a868", linewidth=1)
        by.set_xlabel("position in the sequence")
        by.set_ylabel("mean α")
        by.set_ylim(-0.02, 1.02)
        by.set_title("mean α by position")

    return draw


def _ratios(s: Summary) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        ax = axes[0, 0]
        seen = np.zeros(RATIO_BINS, dtype=bool)
        for m in MODELS:
            h = s.ratios[m].log_ratio
            seen |= h.counts > 0
            if h.n:
                _bars(ax, h.edges, h.counts, fill=False, color=COLOURS[m], label=f"{MODEL_NAMES[m]}: log π − log q*")
        ax.axvline(
            math.log(s.threshold), color="grey", linestyle=":", linewidth=1, label=f"log C (C = {s.threshold:g})"
        )
        ax.set_yscale("log")
        if seen.any():  # the range the tokens fill, not the whole ±10
            edges = s.ratios[MODELS[0]].log_ratio.edges
            lo, hi = np.flatnonzero(seen)[[0, -1]]
            ax.set_xlim(min(edges[lo] - 0.5, -1.0), max(edges[hi + 1] + 0.5, 1.0))
        ax.set_xlabel("log ratio per token (nats)")
        ax.set_ylabel("tokens")
        ax.set_title("per-token log ratios")
        ax.legend(fontsize=7)

    return draw


def _ess(s: Summary) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        for ax, m in zip(axes[0], MODELS, strict=True):
            st = s.ratios[m]
            _bars(ax, st.ess.edges, st.ess.counts, fill=False, color=COLOURS[m], label="plain")
            _bars(ax, st.ess_truncated.edges, st.ess_truncated.counts, fill=False, color=COLOURS[m],
                  linestyle="--", label=f"truncated min(w, {s.threshold:g})")  # fmt: skip
            ax.set_xlabel("ESS / n of the sequence's token weights")
            ax.set_ylabel("sequences")
            ax.set_title(f"{MODEL_NAMES[m]}: ESS per sequence")
            ax.legend(fontsize=7, loc="upper left")

    return draw


def _diagnostics(s: Summary, names: list[str]) -> Callable[[Any], None]:
    def draw(axes: Any) -> None:
        flat = axes.ravel()
        for ax, name in zip(flat[: len(names)], names, strict=True):
            values = s.diagnostics[name].values()
            ax.hist(values, bins=30, color="#c44e52")
            ax.set_title(f"{name}: {DIAGNOSTIC_LABELS.get(name, '')}".rstrip(": "), fontsize=8)
        for ax in flat[len(names) :]:
            ax.set_visible(False)

    return draw


def _speculation(s: Summary) -> Callable[[Any], None]:
    assert s.speculation is not None
    counts = s.speculation.accepted_per_round
    last = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 1

    def draw(axes: Any) -> None:
        ax = axes[0, 0]
        ax.bar(np.arange(last), counts[:last], color="#dd8452")
        ax.set_xlabel("accepted drafted tokens in the round")
        ax.set_ylabel("rounds")
        ax.set_title("speculative acceptance")

    return draw


def plots(s: Summary) -> list[tuple[str, str, str]]:
    """(id, caption, svg) of every plot the summary has data for."""
    out = [("plot-lengths", "Lengths of the finished records and finish reasons of all", _svg(_lengths(s), 1, 2))]
    if s.alpha.n:
        out.append(("plot-alpha", "α over all tokens of the finished records, and its mean by position",
                    _svg(_alpha(s), 1, 2)))  # fmt: skip
    if s.has_ratios:
        out.append(("plot-log-ratios", "Per-token log ratios (log scale of counts; ratios beyond ±10 not shown)",
                    _svg(_ratios(s))))  # fmt: skip
        out.append(("plot-ess", "Effective sample size (Σw)²/(n·Σw²) of each sequence's token weights",
                    _svg(_ess(s), 1, 2)))  # fmt: skip
    names = s.diagnostic_names()
    if names:
        cols = min(3, len(names))
        rows = math.ceil(len(names) / cols)
        out.append(("plot-diagnostics", "Diagnostics kept by the run (--diagnostics): each record's mean",
                    _svg(_diagnostics(s, names), rows, cols, (9.0, 2.2 * rows))))  # fmt: skip
    if s.speculation is not None:
        out.append(("plot-speculation", "Drafted tokens accepted per speculative round",
                    _svg(_speculation(s), size=(9.0, 2.6))))  # fmt: skip
    return out


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
pre { background: #f6f6f6; padding: 1em; overflow-x: auto; font-size: 12px; line-height: 1.35; }
figure.plot { margin: 1.5em 0; }
figure.plot svg { width: 100%; height: auto; display: block; }
figcaption { font-size: 13px; color: #555; margin-top: .3em; }
"""


def render_html(summary: Summary, text: str, source: str) -> str:
    """The page: title, the text report, then each plot in a captioned figure."""
    figures = "\n".join(
        f'<figure class="plot" id="{pid}">\n{svg}\n<figcaption>{html.escape(caption)}</figcaption>\n</figure>'
        for pid, caption, svg in plots(summary)
    )
    title = html.escape(f"dualsample report: {os.path.basename(source.rstrip('/')) or source}")
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{title}</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n<h1>{title}</h1>\n"
        f"<pre>{html.escape(text)}</pre>\n{figures}\n</body>\n</html>\n"
    )
