"""`dualsample report`: statistics against direct computation, inputs, the CLI, the HTML page
in a real browser, and flat memory on large files."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dualsample_rs.cli.parsing import main
from dualsample_rs.exceptions import InvalidInputError
from dualsample_rs.report import render_text, summarise
from dualsample_rs.report.accumulate import Histogram, IntCounts, LogSumExp, PositionMeans, Reservoir
from dualsample_rs.report.reading import iter_chunks


def synthetic_record(
    rng: np.random.Generator,
    index: int,
    tokens: int,
    *,
    rescore: bool = False,
    speculate: bool = False,
    diagnostics: bool = False,
    failed: bool = False,
) -> dict[str, Any]:
    """A record in the shape `GenerationOutput.to_record` writes, with plausible values."""
    a = rng.uniform(0, 1, tokens)
    lt = -rng.exponential(1.5, tokens)
    lth = lt + rng.normal(0, 1.0, tokens)
    lq = (1 - a) * lth + a * lt + rng.normal(0, 0.1, tokens)
    observed_t = rng.uniform(size=tokens) < 0.95

    def r4(x: np.ndarray) -> list[float]:
        return np.round(x, 4).tolist()  # type: ignore[no-any-return]

    record: dict[str, Any] = {
        "id": index,
        "prompt": f"question {index}",
        "teacher_prompt": None,
        "text": "x" * tokens,
        "token_ids": rng.integers(0, 50_000, tokens).tolist(),
        "alpha": r4(a),
        "logp_theta": r4(lth),
        "logp_t": r4(lt),
        "logq": r4(lq),
        "observed_theta": [True] * tokens,
        "observed_t": observed_t.tolist(),
        "fallback": [False] * tokens,
        "finish_reason": "error" if failed else ("stop" if index % 3 else "length"),
        "error": "boom" if failed else None,
        "diagnostics": {},
    }
    if diagnostics:
        names = ("kl_theta", "kl_t", "ess_theta", "ess_t", "entropy", "js")
        means = rng.uniform(0, 1, len(names)).tolist()
        record["diagnostics"] = {
            n: {"mean": v, "std": 0.1, "min": 0.0, "max": 1.0} for n, v in zip(names, means, strict=True)
        }
    if rescore and not failed:
        record["logp_theta_exact"] = r4(lth - 0.01)
        record["logp_t_exact"] = r4(lt - 0.01)
    if speculate:
        rounds = np.sort(rng.integers(0, max(1, tokens // 3), tokens))
        _, rounds = np.unique(rounds, return_inverse=True)
        last = np.r_[rounds[1:] != rounds[:-1], True] if tokens else np.zeros(0, bool)
        record["round"] = rounds.tolist()
        record["drafted"] = (~last).tolist()
    return record


def write_records(path: Path, n: int, tokens: int = 64, seed: int = 0, **kwargs: Any) -> list[dict[str, Any]]:
    """Write `n` synthetic records as JSONL; return them (only when small)."""
    rng = np.random.default_rng(seed)
    kept: list[dict[str, Any]] = []
    with open(path, "w") as f:
        for i in range(n):
            r = synthetic_record(rng, i, tokens if tokens >= 0 else int(rng.integers(1, 40)), **kwargs)
            f.write(json.dumps(r) + "\n")
            if n <= 5000:
                kept.append(r)
    return kept


# ---------------------------------------------------------------- accumulators


def test_histogram_counts_moments_and_quantiles() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(0, 3, 20_000)
    h = Histogram(-5, 5, 50)
    for part in np.array_split(np.r_[values, [np.nan, np.inf]], 7):
        h.add(part)
    assert h.n == values.size and h.nonfinite == 2
    assert h.below == np.count_nonzero(values < -5) and h.above == np.count_nonzero(values > 5)
    expected, _ = np.histogram(values[(values >= -5) & (values <= 5)], bins=h.edges)
    np.testing.assert_array_equal(h.counts, expected)
    assert h.moments.mean == pytest.approx(values.mean(), abs=1e-12)
    assert h.moments.std == pytest.approx(values.std(), rel=1e-12)
    assert h.quantile(0.5) == pytest.approx(np.median(values), abs=0.2)


def test_int_counts_position_means_reservoir_and_lse() -> None:
    rng = np.random.default_rng(2)
    lengths = rng.integers(0, 300, 5000)
    c = IntCounts(256)
    c.add(lengths)
    assert c.n == 5000 and c.max == lengths.max() and c.overflow == np.count_nonzero(lengths >= 256)
    assert c.quantile(0.5) == np.sort(lengths)[math.ceil(0.5 * 5000) - 1]

    p = PositionMeans(4)
    p.add(np.array([0, 1, 1, 5]), np.array([1.0, 2.0, 4.0, 9.0]))
    np.testing.assert_allclose(p.means(), [1.0, 3.0])
    assert p.beyond == 1

    r = Reservoir(100, seed=3)
    stream = rng.uniform(size=50_000)
    for part in np.array_split(stream, 9):
        r.add(part)
    assert r.values().size == 100 and set(r.values()) <= set(stream)
    assert abs(float(np.mean(r.values())) - 0.5) < 0.1  # a uniform sample, not the first 100

    x = rng.normal(0, 30, 1000)  # weights e^±100: plain sums would overflow
    lse = LogSumExp()
    lse.add(x[:500])
    lse.add(x[500:])
    w = np.exp(x - x.max())
    assert lse.ess_fraction() == pytest.approx(w.sum() ** 2 / (w.size * (w * w).sum()), rel=1e-9)


# ---------------------------------------------------------------- statistics


def _direct_ess(logp: list[float], logq: list[float], cap: float | None) -> float:
    w = np.exp(np.clip(np.array(logp) - np.array(logq), -20, 20))
    if cap is not None:
        w = np.minimum(w, cap)
    return float(w.sum() ** 2 / (w.size * (w * w).sum()))


def test_summary_matches_direct_computation(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    records = write_records(path, 300, tokens=-1, rescore=True, speculate=True, diagnostics=True)
    records.append(synthetic_record(np.random.default_rng(9), 300, 7, failed=True))
    with open(path, "a") as f:
        f.write(json.dumps(records[-1]) + "\n\n")  # a blank line is skipped
    s = summarise(str(path), threshold=1.5)
    ok = [r for r in records if r["finish_reason"] != "error"]
    assert (s.records, s.failed, s.finished) == (301, 1, 300)
    assert s.finish_reasons["error"] == 1 and s.finish_reasons["stop"] + s.finish_reasons["length"] == 300
    assert s.tokens == sum(len(r["token_ids"]) for r in ok)
    assert s.tokens_all == s.tokens + 7

    alpha = np.concatenate([r["alpha"] for r in ok])
    assert s.alpha.moments.mean == pytest.approx(alpha.mean(), rel=1e-12)
    first = np.array([r["alpha"][0] for r in ok])
    assert s.alpha_by_position.means()[0] == pytest.approx(first.mean(), rel=1e-12)

    for model in ("theta", "t"):
        st = s.ratios[model]
        ratio = np.concatenate([np.subtract(r[f"logp_{model}_exact"], r["logq"]) for r in ok])
        assert st.exact_tokens == ratio.size  # rescored: every ratio from the exact values
        assert st.log_ratio.moments.mean == pytest.approx(ratio.mean(), rel=1e-9)
        assert st.truncated == np.count_nonzero(np.exp(ratio) > 1.5)
        plain = [_direct_ess(r[f"logp_{model}_exact"], r["logq"], None) for r in ok]
        capped = [_direct_ess(r[f"logp_{model}_exact"], r["logq"], 1.5) for r in ok]
        assert st.ess.moments.mean == pytest.approx(np.mean(plain), rel=1e-9)
        assert st.ess_truncated.moments.mean == pytest.approx(np.mean(capped), rel=1e-9)
        seq = np.array([np.sum(np.subtract(r[f"logp_{model}_exact"], r["logq"])) for r in ok])
        w = np.exp(seq - seq.max())
        assert st.sequence_weights.ess_fraction() == pytest.approx(w.sum() ** 2 / (w.size * (w * w).sum()))
        wc = np.minimum(np.exp(seq), 1.5)
        assert st.sequence_ess_truncated() == pytest.approx(wc.sum() ** 2 / (wc.size * (wc * wc).sum()))

    kl = [r["diagnostics"]["kl_theta"]["mean"] for r in ok]
    assert s.diagnostics["kl_theta"].moments.mean == pytest.approx(np.mean(kl))
    assert s.diagnostic_names()[:2] == ["kl_theta", "kl_t"]

    assert s.speculation is not None
    rounds = sum(max(r["round"]) + 1 for r in ok)
    assert s.speculation.rounds == rounds
    assert s.speculation.drafted == sum(sum(r["drafted"]) for r in ok)
    assert s.speculation.accepted_per_round.sum() == rounds

    text = render_text(s, "r.jsonl")
    for needle in ("records", "finished 300", "failed 1", "exact (--rescore)", "kl_theta", "speculation",
                   "min(w, 1.5)", "α by position"):  # fmt: skip
        assert needle in text, needle


def test_served_ratios_say_how_many_were_estimated(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    records = write_records(path, 50)
    s = summarise(str(path))
    estimated = sum(r["observed_t"].count(False) for r in records)
    assert s.ratios["t"].estimated_tokens == estimated and s.ratios["t"].exact_tokens == 0
    assert s.ratios["theta"].observed_tokens == 50 * 64
    text = render_text(s)
    assert "served, all observed" in text and "estimated" in text
    assert s.speculation is None and not s.diagnostics
    assert "speculation" not in text and "diagnostics" not in text


def test_parquet_file_and_directory_read_like_jsonl(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "r.jsonl"
    records = write_records(path, 120, tokens=-1, rescore=True, diagnostics=True)
    records[5].pop("logp_theta_exact")  # a record without the exact values: a null in the column
    records[5].pop("logp_t_exact")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    rows = [dict(r, diagnostics=json.dumps(r["diagnostics"])) for r in records]  # as Ray writes it
    table = pa.Table.from_pylist(rows)
    (tmp_path / "dir").mkdir()
    pq.write_table(table.slice(0, 70), tmp_path / "dir" / "part-0.parquet", row_group_size=16)
    pq.write_table(table.slice(70), tmp_path / "dir" / "part-1.parquet", row_group_size=16)
    pq.write_table(table, tmp_path / "one.parquet", row_group_size=16)
    want = render_text(summarise(str(path)))
    assert render_text(summarise(str(tmp_path / "one.parquet"))) == want
    assert render_text(summarise(str(tmp_path / "dir"))) == want
    assert summarise(str(tmp_path / "dir")).ratios["t"].exact_tokens == sum(
        len(r["token_ids"]) for i, r in enumerate(records) if i != 5
    )


def test_chunks_keep_the_token_layout(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    records = write_records(path, 10, tokens=-1, speculate=True)
    chunks = list(iter_chunks(str(path), chunk_records=4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    flat = np.concatenate([c.tokens["round"] for c in chunks])
    np.testing.assert_array_equal(flat, np.concatenate([r["round"] for r in records]))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2: not a JSON record"),
        ("[1, 2]", "line 2: not a JSON object"),
        ('{"token_ids": [1, 2], "alpha": [0.5]}', "line 2: 'alpha' has 1 entries, 'token_ids' 2"),
        ('{"token_ids": 3}', "line 2: 'token_ids' is not a list"),
        ('{"token_ids": [1], "logq": ["x"]}', "line 2: 'logq' holds a value that is not a number"),
    ],
)
def test_bad_records_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "r.jsonl"
    write_records(path, 1)
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        summarise(str(path))


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"RECORDS: .* does not exist"):
        summarise(str(tmp_path / "missing.jsonl"))
    with pytest.raises(InvalidInputError, match="threshold"):
        summarise(str(tmp_path), threshold=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match=r"no \.parquet or \.jsonl"):
        summarise(str(tmp_path / "empty"))


# ---------------------------------------------------------------- command line and page


def test_cli_prints_the_report_and_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.jsonl"
    write_records(path, 20, rescore=True)
    assert main(["report", str(path), "--is-threshold", "3"]) == 0
    out = capsys.readouterr().out
    assert "records" in out and "min(w, 3)" in out
    assert main(["report", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dualsample report: error: RECORDS:") and err.count("\n") == 1


def _page(tmp_path: Path, **kwargs: Any) -> tuple[Path, str]:
    pytest.importorskip("matplotlib")
    path = tmp_path / "r.jsonl"
    write_records(path, 200, tokens=-1, rescore=True, speculate=True, diagnostics=True, **kwargs)
    page = tmp_path / "report.html"
    assert main(["report", str(path), "--html", str(page)]) == 0
    return page, page.read_text()


PLOTS = ("plot-lengths", "plot-alpha", "plot-log-ratios", "plot-ess", "plot-diagnostics", "plot-speculation")


@pytest.mark.slow
def test_html_page_is_self_contained(tmp_path: Path) -> None:
    _, html = _page(tmp_path)
    for pid in PLOTS:
        assert f'id="{pid}"' in html
    assert html.count("<svg") == len(PLOTS)
    # nothing fetched: no scripts, no external stylesheets, images or fonts
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert "url(http" not in html


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (make test installs it)")
    return exe


# Appended to a copy of the page only in the test: after load, each plot's rendered size
# into the DOM that --dump-dom prints.
MEASURE = """<script>
window.addEventListener("load", () => {
  const sizes = {};
  for (const f of document.querySelectorAll("figure.plot")) {
    const r = f.querySelector("svg").getBoundingClientRect();
    sizes[f.id] = [r.width, r.height];
  }
  const pre = document.createElement("pre");
  pre.id = "measured";
  pre.textContent = JSON.stringify(sizes);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.slow
def test_html_page_renders_in_chromium(tmp_path: Path) -> None:
    exe = _chromium()
    page, html = _page(tmp_path)
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", MEASURE + "</body>"))
    flags = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--window-size=1200,4000", "--virtual-time-budget=5000"]  # fmt: skip
    dom = subprocess.run([*flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="measured">(.*?)</pre>', dom.stdout)
    assert found, dom.stderr[-2000:]
    sizes = json.loads(found.group(1).replace("&quot;", '"'))
    assert sorted(sizes) == sorted(PLOTS)
    for pid, (width, height) in sizes.items():
        assert width > 300 and height > 100, (pid, width, height)

    png = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={png}", page.as_uri()], capture_output=True, timeout=120, check=True)
    from matplotlib.image import imread

    pixels = imread(png)[..., :3]
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    ink = np.any(pixels < 0.9, axis=-1)
    assert 0.01 < ink.mean() < 0.6  # drawn on, not blank nor a solid block
    assert np.any(np.abs(pixels[..., 0] - pixels[..., 2]) > 0.3)  # the plots' colours, not only black text
    if os.environ.get("DUALSAMPLE_KEEP_SCREENSHOT"):
        shutil.copy(png, os.environ["DUALSAMPLE_KEEP_SCREENSHOT"])


# ---------------------------------------------------------------- memory


def _peak_rss_kb(path: Path, *args: str) -> int:
    code = (
        "import resource, sys\n"
        "from dualsample_rs.cli.parsing import main\n"
        "import io, contextlib\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    assert main(['report', {str(path)!r}, *{list(args)!r}]) == 0\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=1800)
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_file(tmp_path: Path) -> None:
    small, large = tmp_path / "small.jsonl", tmp_path / "large.jsonl"
    write_records(small, 1_000, rescore=True, speculate=True, diagnostics=True)
    with open(large, "w") as f:  # 20 times as many records (repeated: the report does not mind)
        f.writelines(small.read_text() for _ in range(20))
    a, b = _peak_rss_kb(small), _peak_rss_kb(large)
    assert b < a + 20_000, (a, b)  # within 20 MB


@pytest.mark.slow
def test_a_runs_jsonl_and_parquet_outputs_give_the_same_report(urls: tuple[str, str], tmp_path: Path) -> None:
    """End to end: one run kept as JSONL and as the Parquet output (typed columns, its
    diagnostics a struct) reports the same text."""
    from support import write_input

    inp = tmp_path / "in.jsonl"
    write_input(inp, 8)
    texts = []
    for suffix in ("jsonl", "parquet"):
        out = tmp_path / f"run.{suffix}"
        done = subprocess.run(
            [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
             "--input", str(inp), "--output", str(out), "--max-tokens", "12", "--seed", "2", "--quiet",
             "--rescore", "--diagnostics"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        shown = subprocess.run([sys.executable, "-m", "dualsample_rs", "report", str(out)],
                               capture_output=True, text=True, timeout=120)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        texts.append(shown.stdout.replace(str(out), "RECORDS"))
    assert texts[0] == texts[1]
    assert re.search(r"\b8 records\b", texts[0]), texts[0]
