"""Start and stop a real SGLang server on CPU for the engine tests.

Standard library only: pytest imports this under the project's own venv, while the server
runs from the SGLang venv that ``install_sglang.sh`` builds::

    from tests.engines.sglang_engine import start_sglang

    with start_sglang(model_dir, 0) as server:   # port 0: pick a free one
        requests.post(server.url + "/generate", json={...})

What the CPU path needs, all set here:

- ``SGLANG_USE_CPU_ENGINE=1`` and ``--device cpu``;
- ``--dtype float32``, else a float32 checkpoint is served in float16;
- ``--attention-backend torch_native``;
- ``--sleep-on-idle``, else every idle scheduler keeps most of a core busy;
- ``sgl_kernel_stub/`` first on ``PYTHONPATH``: the PyPI ``sgl_kernel`` is CUDA-only and
  cannot load here, and the CPU engine imports two small host ops from it at start;
- a bounded KV pool (``--max-total-tokens``): on CPU SGLang otherwise sizes the pool from
  the free RAM, and two servers must fit side by side.

A server takes about 50 s to start and about 2.7 GiB of RAM.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from .paths import ENGINES_DIR
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from paths import ENGINES_DIR

HERE = Path(__file__).resolve().parent
INSTALL_SCRIPT = HERE / "install_sglang.sh"
STUB_DIR = HERE / "sgl_kernel_stub"
SGLANG_VERSION = "0.5.23"
SGLANG_VENV = ENGINES_DIR / "sglang"
SGLANG_PYTHON = SGLANG_VENV / "bin" / "python"
SGLANG_MARKER = SGLANG_VENV / f".installed-sglang-{SGLANG_VERSION}"

START_TIMEOUT = 300.0
STOP_GRACE = 15.0

# Flags every CPU server gets. A caller's extra argument for one of these options wins.
CPU_FLAGS: tuple[str, ...] = (
    "--device", "cpu",
    "--dtype", "float32",
    "--attention-backend", "torch_native",
    "--sleep-on-idle",
    "--max-total-tokens", "32768",
    "--log-level", "info",
)  # fmt: skip

# One torch thread per server: two servers share the cores, and with torch's default (a
# thread per core each) they oversubscribe them; q* one token per step ran 4.9x faster
# with one (docs/engine-time.md). An OMP_NUM_THREADS in the `env` given wins.
CPU_ENV: dict[str, str] = {"SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1"}


def is_installed() -> bool:
    """Whether ``install_sglang.sh`` has finished installing into the engine venv."""
    return SGLANG_MARKER.is_file() and SGLANG_PYTHON.exists()


def install(timeout: float = 3600.0) -> Path:
    """Run ``install_sglang.sh`` (a no-op once installed); the venv's python."""
    if is_installed():
        return SGLANG_PYTHON
    env = dict(os.environ, DUALSAMPLE_ENGINES_DIR=str(ENGINES_DIR), SGLANG_VERSION=SGLANG_VERSION)
    subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, env=env, timeout=timeout, stdout=subprocess.DEVNULL)
    return SGLANG_PYTHON


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _option_names(args: Sequence[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in args if a.startswith("--")}


def _merge_flags(defaults: Sequence[str], extra: Sequence[str]) -> list[str]:
    """``defaults`` minus the options that ``extra`` sets again, then ``extra``."""
    given = _option_names(extra)
    out: list[str] = []
    i = 0
    while i < len(defaults):
        flag = defaults[i]
        has_value = i + 1 < len(defaults) and not defaults[i + 1].startswith("--")
        if flag not in given:
            out.append(flag)
            if has_value:
                out.append(defaults[i + 1])
        i += 2 if has_value else 1
    return out + list(extra)


class SGLangServer:
    """A running ``sglang.launch_server``: its URL, process and log. ``stop()`` ends it."""

    def __init__(
        self, proc: subprocess.Popen, port: int, log_path: Path, tmp_dir: Path, argv: list[str], model_dir: str
    ):
        self.proc = proc
        self.model_dir = model_dir
        self.pid = proc.pid
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.argv = argv
        self.start_seconds: float | None = None
        self._tmp_dir = tmp_dir

    def __repr__(self) -> str:
        return f"SGLangServer(pid={self.pid}, url={self.url!r}, log={str(self.log_path)!r})"

    def __enter__(self) -> SGLangServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError as e:
            return f"(no log: {e})"
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, Any]:
        """GET ``path``: the HTTP status and the body (parsed JSON when it is JSON)."""
        return self._call(urllib.request.Request(self.url + path), timeout)

    def post(self, path: str, body: Any, timeout: float = 120.0) -> tuple[int, Any]:
        """POST ``body`` as JSON to ``path``: the HTTP status and the body."""
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        return self._call(req, timeout)

    @staticmethod
    def _call(req: urllib.request.Request, timeout: float) -> tuple[int, Any]:
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text)
        except ValueError:
            return status, text

    def healthy(self, timeout: float = 5.0) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def rss_bytes(self) -> int:
        """Resident memory of the server and all its processes, shared pages counted once
        per process (Linux ``VmRSS``); ``pss_bytes()`` is the fairer total."""
        return self._sum_proc_field("status", "VmRSS:")

    def pss_bytes(self) -> int:
        """Proportional set size of the server and all its processes (Linux): what the
        server adds to the machine, shared library pages split between their users."""
        return self._sum_proc_field("smaps_rollup", "Pss:")

    def _sum_proc_field(self, file: str, field: str) -> int:
        total = 0
        for pid in self._tree_pids():
            try:
                with open(f"/proc/{pid}/{file}") as f:
                    for line in f:
                        if line.startswith(field):
                            total += int(line.split()[1]) * 1024
                            break
            except OSError:
                pass
        return total

    def _tree_pids(self) -> list[int]:
        """The server process and its descendants, from /proc."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, []))
        return out

    def _serves_our_model(self) -> bool:
        """Whether the server on our port is this one (not another that holds the port)."""
        try:
            status, info = self.get("/model_info", timeout=5.0)
        except (urllib.error.URLError, OSError):
            return False
        return status == 200 and isinstance(info, dict) and info.get("model_path") == self.model_dir

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until ``/health`` answers 200; on death or timeout stop and raise with the log tail."""
        start = time.monotonic()
        while True:
            if not self.alive():
                code = self.proc.returncode
                self.stop()
                raise RuntimeError(f"SGLang server exited with {code} while starting; log {self.log_path}:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            if self.healthy() and self._serves_our_model():
                self.start_seconds = time.monotonic() - start
                return
            if time.monotonic() - start > timeout:
                self.stop()
                raise RuntimeError(f"SGLang server not ready after {timeout:.0f} s; log {self.log_path}:\n"
                                   f"{self.log_tail()}")  # fmt: skip
            time.sleep(0.5)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM the server, wait up to ``grace`` s, then SIGKILL its whole process group."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=grace)
        # The server was started in its own session, so its group id is its pid; this also
        # reaches scheduler and detokenizer processes left behind by a crash.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        shutil.rmtree(self._tmp_dir, ignore_errors=True)


def stop_all(*servers: SGLangServer, grace: float = STOP_GRACE) -> None:
    """Stop several servers at once: SIGTERM to all first, so their graceful shutdowns
    (about 5-7 s each) overlap, then ``stop()`` each."""
    for server in servers:
        if server.alive():
            with contextlib.suppress(ProcessLookupError):
                server.proc.send_signal(signal.SIGTERM)
    for server in servers:
        server.stop(grace)


def server_command(
    model_dir: str | os.PathLike[str],
    port: int,
    *extra_args: str,
    python: str | os.PathLike[str] | None = None,
    cpu: bool = True,
) -> list[str]:
    """The argv that starts a server for ``model_dir`` on ``127.0.0.1:port`` (with the
    CPU flags unless ``cpu`` is false)."""
    py = str(python or SGLANG_PYTHON)
    head = [py, "-m", "sglang.launch_server", "--model-path", str(model_dir), "--host", "127.0.0.1",
            "--port", str(port)]  # fmt: skip
    return head + _merge_flags(CPU_FLAGS if cpu else (), extra_args)


def server_env(
    env: Mapping[str, str] | None = None, tmp_dir: str | os.PathLike[str] | None = None, cpu: bool = True
) -> dict[str, str]:
    """The server's environment: this one, without the caller's venv, plus the CPU settings,
    the stub ``sgl_kernel`` first on ``PYTHONPATH``, then ``env`` on top (its ``PYTHONPATH``,
    if any, goes after the stub). Without ``cpu``, neither the CPU settings nor the stub:
    on a GPU the real ``sgl_kernel`` must load."""
    out = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    if cpu:
        out.update(CPU_ENV)
    extra = dict(env or {})
    paths = [str(STUB_DIR)] if cpu else []
    if extra.get("PYTHONPATH"):
        paths.append(extra.pop("PYTHONPATH"))
    out.update(extra)
    if paths:
        out["PYTHONPATH"] = os.pathsep.join(paths)
    out.setdefault("PYTHONUNBUFFERED", "1")
    out.setdefault("HF_HUB_OFFLINE", "1")
    out.setdefault("TRANSFORMERS_OFFLINE", "1")
    if tmp_dir is not None:
        # SGLang leaves its ZeroMQ ipc files in the temp dir; give each server its own.
        out["TMPDIR"] = str(tmp_dir)
    return out


def start_sglang(
    model_dir: str | os.PathLike[str],
    port: int = 0,
    *extra_args: str,
    env: Mapping[str, str] | None = None,
    log_path: str | os.PathLike[str] | None = None,
    timeout: float = START_TIMEOUT,
    wait: bool = True,
    python: str | os.PathLike[str] | None = None,
    cpu: bool = True,
) -> SGLangServer:
    """Start ``python -m sglang.launch_server`` from the engine venv on CPU and wait until
    ``/health`` answers (unless ``wait`` is false; then call ``wait_ready()``).

    ``port`` 0 picks a free port. ``extra_args`` go after the CPU flags, and an option given
    there replaces the default of the same name (e.g. ``"--max-total-tokens", "8192"``).
    The log goes to ``log_path`` (default: a file in a fresh temp dir, kept after stop).
    Raises ``RuntimeError`` with the log tail when the server dies or is not ready in time.
    ``cpu`` false drops the CPU flags, environment and stub (a GPU machine); ``model_dir``
    may then be a Hugging Face name.
    """
    py = Path(python) if python else SGLANG_PYTHON
    if not py.exists():
        raise FileNotFoundError(f"no SGLang venv at {py}: run bash {INSTALL_SCRIPT}")
    if cpu and not Path(model_dir).is_dir():
        raise FileNotFoundError(f"no model directory {model_dir}")
    port = port or free_port()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"sglang-{port}-"))
    if log_path is None:
        log_dir = Path(tempfile.mkdtemp(prefix=f"sglang-log-{port}-"))
        log_path = log_dir / "server.log"
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    argv = server_command(model_dir, port, *extra_args, python=py, cpu=cpu)
    with open(log_path, "ab") as log:
        log.write(("$ " + " ".join(argv) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=server_env(env, tmp_dir, cpu), cwd=tmp_dir, start_new_session=True,
        )  # fmt: skip
    server = SGLangServer(proc, port, log_path, tmp_dir, argv, str(model_dir))
    if wait:
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.stop()
            raise
    return server


def main() -> None:
    """``python tests/engines/sglang_engine.py MODEL_DIR [PORT] [EXTRA ...]``: start one server
    in the foreground, print its URL, stop it on Ctrl-C."""
    if len(sys.argv) < 2:
        raise SystemExit(main.__doc__)
    model = sys.argv[1]
    port = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    server = start_sglang(model, port, *sys.argv[3:])
    print(f"{server.url} pid {server.pid} started in {server.start_seconds:.1f} s, log {server.log_path}", flush=True)
    try:
        while server.alive():
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
