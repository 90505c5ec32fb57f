"""What `--save-topk` costs: records per second and bytes per token on disk, JSONL and
Parquet, without it and with it (the teacher's 5 and 20, and both models' 20).

`dualsample generate` over 400 prompts, 64 tokens each, against two reference servers
on loopback (`--top-k 20`), the whole CLI run timed. ``extra_info`` has records/s and
bytes per generated token of the output file; the cases run side by side in one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from dualsample_rs.server import running_server

RECORDS = 400
TOKENS = 64
CASES = {
    "none": [],
    "teacher 5": ["--save-topk", "5"],
    "teacher 20": ["--save-topk", "20"],
    "both 20": ["--save-topk", "20", "--save-topk-of", "both"],
}


@pytest.fixture(scope="module")
def urls() -> Iterator[tuple[str, str]]:
    with running_server("base") as a, running_server("teacher") as b:
        yield a, b


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
@pytest.mark.parametrize("case", list(CASES))
def test_save_topk_cost(benchmark, urls: tuple[str, str], tmp_path: Path, case: str, fmt: str) -> None:
    benchmark.group = f"dualsample generate --save-topk, {RECORDS} records of {TOKENS} tokens"
    inp, out = tmp_path / "in.jsonl", tmp_path / f"out.{fmt}"
    records = RECORDS // 20 if benchmark.disabled else RECORDS  # run once by `make test`: the same path
    with inp.open("w") as f:
        for i in range(records):
            f.write(json.dumps({"id": i, "prompt": f"Question {i}: why is the sky blue?"}) + "\n")
    cmd = [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
           "--input", str(inp), "--output", str(out), "--max-tokens", str(TOKENS), "--top-k", "20",
           "--stop-token-ids", "", "--quiet", "--overwrite", *CASES[case]]  # fmt: skip
    walls: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        walls.append(time.perf_counter() - t0)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info["records_per_second"] = records / min(walls)
    benchmark.extra_info["bytes_per_token"] = os.path.getsize(out) / (records * TOKENS)
