"""Records per second for short sequences (`--max-tokens 2`, the per-record cost) and
tokens/s for longer ones (64 tokens × 256 prompts), side by side with the earlier build.

`dualsample generate` against two reference servers on loopback, the whole CLI run timed
(start-up included). With ``make previous`` each round runs this package and the one at
`de326a7` (see `previous`) one after the other against the same servers, so that both
see the same load (which goes first alternates); the best of the rounds is kept for each. ``extra_info`` has
records/s or tokens/s for each package, their ratio, the CLI process's own CPU per record,
the requests each server was sent per record (counted by the reference server), and the
machine's load average.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import previous
import pytest
from dualsample_rs.server import request_counts, running_server

# (records, tokens per record): many short records, where the per-record requests set
# the pace, and fewer long ones, where the steps do.
WORKLOADS = {
    "records at --max-tokens 2": (2000, 2),
    # the same, long enough that start-up is a small share of the run
    "records at --max-tokens 2, 16,000 records": (16000, 2),
    "tokens at 64 tokens": (256, 64),
}


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, str]]:
    with running_server("base") as a, running_server("teacher") as b:
        yield a, b


def _command(servers: tuple[str, str], inp: Path, out: Path, tokens: int) -> list[str]:
    return [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", servers[0], "--t-url", servers[1],
            "--input", str(inp), "--output", str(out), "--max-tokens", str(tokens), "--quiet",
            "--overwrite"]  # fmt: skip


def _environment(package: str) -> dict[str, str]:
    """The environment that runs this package's CLI, or the earlier one's (its folder
    first on the path, before the installed package)."""
    env = dict(os.environ)
    # Both from bytecode, as an installed package runs: the first round writes it (into
    # the ignored __pycache__ folders), and compiling ~50 modules each run is no cost of theirs.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if package == "previous":
        root = os.path.dirname(os.path.abspath(os.environ["DUALSAMPLE_PREVIOUS"]))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_generate_side_by_side(benchmark, servers: tuple[str, str], tmp_path: Path, workload: str) -> None:
    benchmark.group = "dualsample generate against the reference servers, whole CLI run"
    records, tokens = WORKLOADS[workload]
    if benchmark.disabled:  # run once by `make test`: the same path, less work
        records //= 50
    packages = ["now"] + (["previous"] if previous.load() is not None else [])
    inp = tmp_path / "in.jsonl"
    with inp.open("w") as f:
        for i in range(records):
            prompt = f"Question {i}: why?" if tokens <= 2 else f"Question {i}: why is the sky blue?\nAnswer:"
            f.write(json.dumps({"id": i, "prompt": prompt, "teacher_prompt": f"Q{i}"}) + "\n")
    walls: dict[str, list[float]] = {p: [] for p in packages}
    cpu: dict[str, list[float]] = {p: [] for p in packages}
    sent: dict[str, dict[str, dict[str, int]]] = {}
    generated: dict[str, int] = {}

    def run() -> None:
        order = packages if len(walls["now"]) % 2 == 0 else packages[::-1]
        for package in order:
            out = tmp_path / f"out-{package}.jsonl"
            before = [request_counts(u) for u in servers]
            t0, used = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run(_command(servers, inp, out, tokens), check=True, capture_output=True,
                           env=_environment(package))  # fmt: skip
            walls[package].append(time.perf_counter() - t0)
            now = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[package].append(now.ru_utime + now.ru_stime - used.ru_utime - used.ru_stime)
            after = [request_counts(u) for u in servers]
            sent[package] = {
                model: {path: n - b.get(path, 0) for path, n in a.items() if n > b.get(path, 0)}
                for model, b, a in zip(("base", "teacher"), before, after, strict=True)
            }
            lines = out.read_text().splitlines()
            assert len(lines) == records
            generated[package] = sum(len(json.loads(line)["token_ids"]) for line in lines)

    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 3, iterations=1)
    unit = "records_per_second" if tokens <= 2 else "tokens_per_second"
    for package in packages:
        # Sequences that meet the end-of-sequence id stop early: count the tokens made.
        done = records if tokens <= 2 else generated[package]
        benchmark.extra_info[f"{unit} {package}"] = done / min(walls[package])
        # The CLI process's own CPU (start-up included), which the load on the machine
        # sways less than the wall time.
        benchmark.extra_info[f"client CPU ms per record {package}"] = 1e3 * min(cpu[package]) / records
        benchmark.extra_info[f"requests per record {package}"] = {
            model: {path: n / records for path, n in counts.items()} for model, counts in sent[package].items()
        }
    if "previous" in walls:
        benchmark.extra_info["ratio to previous"] = min(walls["previous"]) / min(walls["now"])
    benchmark.extra_info["load average"] = os.getloadavg()[0]
