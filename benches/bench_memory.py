"""Peak memory of `dualsample generate` does not grow with the input: 10k and 1M lines.

Each run generates one token per record against the reference servers; the 1M-line run
is stopped with SIGTERM once 20,000 records are written (by then an input read eagerly
would long have shown it). ``extra_info`` has the peak RSS of the generate process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dualsample_rs.server import running_server


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    with running_server("base") as a, running_server("teacher") as b:
        yield a, b


def _input(path: Path, lines: int) -> None:
    with path.open("w") as f:
        for i in range(lines):
            f.write(json.dumps({"id": i, "prompt": f"Q{i}: why?"}) + "\n")


def _peak_rss_mb(servers: tuple[str, str], inp: Path, out: Path, stop_after: int | None) -> float:
    cmd = [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", servers[0], "--t-url", servers[1],
           "--input", str(inp), "--output", str(out), "--max-tokens", "1", "--quiet", "--overwrite"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if stop_after is not None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and out.stat().st_size > 0 and _count(out) >= stop_after:
                p.send_signal(signal.SIGTERM)
                break
            time.sleep(0.5)
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    assert p.returncode in (0, 128 + signal.SIGTERM), p.returncode
    return usage.ru_maxrss / 1024  # KiB on Linux


def _count(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for _ in f)


@pytest.mark.parametrize("lines", [10_000, 1_000_000])
def test_peak_memory_is_flat_in_the_input_size(benchmark, servers, tmp_path: Path, lines: int) -> None:
    benchmark.group = "peak RSS of dualsample generate"
    if benchmark.disabled:  # run once by `make test`: the same path at a thousandth of the size
        lines //= 1000
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _input(inp, lines)
    rss: list[float] = []
    stop_after = None if lines <= 20_000 else 20_000
    benchmark.pedantic(lambda: rss.append(_peak_rss_mb(servers, inp, out, stop_after)), rounds=1, iterations=1)
    benchmark.extra_info["peak_rss_mb"] = rss[0]
    assert _count(out) >= min(lines, 20_000)
