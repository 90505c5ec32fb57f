"""Start a reference server in a subprocess on a free port, for tests, demos and benchmarks."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import IO

from ..exceptions import DualSampleError

READY_PREFIX = "dualsample serve: listening on "


class ServerStartError(DualSampleError):
    """The reference server did not start."""


def serve_args(model: str = "base", **options: object) -> list[str]:
    """Command-line flags for `dualsample serve` from keyword options (None/False omitted)."""
    args = ["--model", model]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


@contextlib.contextmanager
def running_server(
    model: str = "base", *, host: str = "127.0.0.1", timeout: float = 30.0, **options: object
) -> Iterator[str]:
    """Run `dualsample serve` on a free port and yield its base URL.

    Args:
        model: a preset: ``"base"``, ``"teacher"``, ``"teacher-math"`` (a second teacher
            with the same tokenizer), ``"base-bpe"``, ``"teacher-bpe"`` or ``"base-reversed"``.
        host: address to bind.
        timeout: seconds to wait for the server to listen.
        **options: any `dualsample serve` flag, e.g. ``max_logprobs=50``, ``api_key="k"``,
            ``error_503_rate=0.2`` (underscores for dashes).

    Example:
        >>> with running_server("teacher") as url:  # doctest: +SKIP
        ...     httpx.get(url + "/health")
    """
    cmd = [sys.executable, "-m", "dualsample_rs", "serve", "--host", host, "--port", "0", *serve_args(model, **options)]
    with running_command(cmd, READY_PREFIX, timeout, "reference server") as (url, _):
        yield url


def request_counts(url: str) -> dict[str, int]:
    """The requests a running reference server at `url` has answered so far, by path
    (its ``/dualsample/requests``)."""
    import urllib.request  # here: the command imports this module, and urllib.request is slow to import

    with urllib.request.urlopen(url + "/dualsample/requests") as r:
        counts: dict[str, int] = json.loads(r.read())
    return counts


@contextlib.contextmanager
def running_command(
    cmd: list[str], ready_prefix: str, timeout: float = 30.0, name: str = "server"
) -> Iterator[tuple[str, int]]:
    """Run `cmd` (a server that prints ``<ready_prefix><url>`` once it listens), yield
    the URL and its pid, and stop it (SIGTERM, then SIGKILL after 10 s) on leaving.
    Both its outputs are read all along (a full pipe would stall it); the last lines of
    its stderr go into the error when it does not start."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    errors: collections.deque[str] = collections.deque(maxlen=40)

    def pump(stream: IO[str] | None, put: Callable[[str], object]) -> None:
        assert stream is not None
        for line in stream:
            put(line)

    threading.Thread(target=pump, args=(proc.stdout, lines.put), daemon=True).start()
    threading.Thread(target=pump, args=(proc.stderr, errors.append), daemon=True).start()
    try:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            line = ""
        if not line.startswith(ready_prefix):
            proc.kill()
            proc.wait()
            raise ServerStartError(f"{name} did not start: {line.strip()} {''.join(errors).strip()}")
        yield line[len(ready_prefix) :].strip(), proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def running_flavors(base: str = "base", teacher: str = "teacher") -> Iterator[dict[str, tuple[str, str]]]:
    """A (base, teacher) pair of servers in each flavor: ``{"vllm": ..., "sglang": ...}``;
    the vLLM pair also serves ``/inference/v1/generate`` (the base with trace replay)."""
    with (
        running_server(base, enable_scale_out=True, enable_trace_replay=True, max_logprobs=64) as va,
        running_server(teacher, enable_scale_out=True) as vb,
        running_server(base, flavor="sglang") as sa,
        running_server(teacher, flavor="sglang") as sb,
    ):
        yield {"vllm": (va, vb), "sglang": (sa, sb)}
