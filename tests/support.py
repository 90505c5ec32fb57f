"""Shared by the end-to-end tests: prompts, and running the CLI in a subprocess."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from dualsample_rs.server.process import READY_PREFIX

QUESTIONS = [
    "Why is the sky blue?",
    "What is water made of?",
    "What causes wind?",
    "Why does ice float?",
    "What makes thunder?",
    "How is bread made?",
    "What is gravity?",
    "Why do trees lose their leaves?",
]
PLAIN = [f"Question: {q}\nAnswer:" for q in QUESTIONS]


def write_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            q = QUESTIONS[i % len(QUESTIONS)]
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Question: {q}\nAnswer:", "teacher_prompt": q}) + "\n")


def generate_cli(urls: tuple[str, str], inp: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], "--t-url", urls[1],
         "--input", str(inp), "--output", str(out), "--max-tokens", "25", "--seed", "11", "--quiet", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def wait_cli(p: subprocess.Popen, timeout: float = 120) -> tuple[int, str]:
    """Exit status and stderr, closing the pipes."""
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@contextlib.contextmanager
def doomed_server(*flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """A base reference server taking 20 ms a request, for a test to kill mid-run:
    its URL and process (killed on exit if still running)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualsample_rs", "serve", "--model", "base", "--port", "0", "--latency", "0.02",
         "--latency-rate", "1", *flags],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline()[len(READY_PREFIX) :].strip(), proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout:
            proc.stdout.close()
