"""Shared by the end-to-end tests: prompts, running a coordinator to the end, and running
the CLI or a server to kill in a subprocess. (The servers the tests share are fixtures in
conftest.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator, GenerationOutput
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


def pair_config(urls: tuple[Any, Any], **options: Any) -> CoordinatorConfig:
    """A configuration for the base at ``urls[0]`` and the teacher at ``urls[1]`` (each a
    URL or a tuple of replicas' URLs)."""
    return CoordinatorConfig(theta_url=urls[0], t_url=urls[1], **options)


class Generated(NamedTuple):
    """One run to the end: the outputs in prompt order, the statistics when it ended, and
    the coordinator (closed) for what it learnt at start-up."""

    outputs: list[GenerationOutput]
    statistics: dict[str, Any]
    coordinator: DualVLLMCoordinator


def run_coordinator(
    config: CoordinatorConfig, prompts: Sequence[Any], teacher_prompts: Sequence[Any] | None = None, **generate: Any
) -> Generated:
    """Start a coordinator with `config`, generate one output per prompt (the teacher
    given `teacher_prompts`, else the same prompts), and close it. `generate` goes to
    ``generate_batch_dual_prompts`` (max_tokens, teacher_chat, ...); no progress bar."""
    teacher = prompts if teacher_prompts is None else teacher_prompts

    async def go() -> Generated:
        async with DualVLLMCoordinator(config) as coord:
            outs = await coord.generate_batch_dual_prompts(
                list(prompts), list(teacher), **{"show_progress": False, **generate}
            )
            return Generated(outs, coord.get_statistics(), coord)

    return asyncio.run(go())


def write_input(path: Path, n: int) -> None:
    with path.open("w") as f:
        for i in range(n):
            q = QUESTIONS[i % len(QUESTIONS)]
            f.write(json.dumps({"id": f"q{i}", "prompt": f"Question: {q}\nAnswer:", "teacher_prompt": q}) + "\n")


def generate_cli(
    urls: tuple[str, str], inp: Path, out: Path, *extra: str, teachers: Sequence[str] = ()
) -> subprocess.Popen:
    """``dualsample generate`` in a subprocess: the base at ``urls[0]``, the teacher at
    ``urls[1]``, or with `teachers` those ``--teacher`` values instead."""
    servers = [flag for spec in teachers for flag in ("--teacher", spec)] or ["--t-url", urls[1]]
    return subprocess.Popen(
        [sys.executable, "-m", "dualsample_rs", "generate", "--theta-url", urls[0], *servers,
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
def doomed_server(*flags: str, model: str = "base", latency: float = 0.02) -> Iterator[tuple[str, subprocess.Popen]]:
    """A reference server (the base unless told) taking `latency` seconds a request, for a
    test to kill mid-run: its URL and process (killed on exit if still running)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dualsample_rs", "serve", "--model", model, "--port", "0", "--latency", str(latency),
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
