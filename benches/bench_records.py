"""Records per second for short sequences (`--max-tokens 2`): the per-record cost.

`dualsample generate` over 5,000 one-line prompts against two reference servers on
loopback, the whole CLI run timed (start-up included). ``extra_info`` has records/s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dualsample_rs.server import running_server

RECORDS = 5000


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    with running_server("base") as a, running_server("teacher") as b:
        yield a, b


def test_records_per_second_at_two_tokens(benchmark, servers: tuple[str, str], tmp_path: Path) -> None:
    benchmark.group = "dualsample generate, --max-tokens 2"
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    records = RECORDS // 50 if benchmark.disabled else RECORDS  # run once by `make test`: the same path
    with inp.open("w") as f:
        for i in range(records):
            f.write(json.dumps({"id": i, "prompt": f"Question {i}: why?", "teacher_prompt": f"Q{i}"}) + "\n")
    cmd = [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", servers[0], "--t-url", servers[1],
           "--input", str(inp), "--output", str(out), "--max-tokens", "2", "--quiet", "--overwrite"]  # fmt: skip
    walls: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 2, iterations=1)
    assert out.read_text().count("\n") == records
    benchmark.extra_info["records_per_second"] = records / min(walls)
