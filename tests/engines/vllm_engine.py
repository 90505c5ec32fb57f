"""Starts and stops real vLLM servers (CPU build) for the tests.

Standard library only: it runs under the project's own Python, while the server runs
under the engine venv that ``install_vllm.sh`` makes.

    from engines.vllm_engine import ensure_models, start_vllm

    models = ensure_models()
    with start_vllm(models / "base", 0) as server:
        server.url  # http://127.0.0.1:<port>
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

try:
    from . import build_models
    from .paths import ENGINES_DIR, MODELS_DIR, VLLM_PYTHON
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import build_models
    from paths import ENGINES_DIR, MODELS_DIR, VLLM_PYTHON

HERE = Path(__file__).resolve().parent
INSTALL_SCRIPT = HERE / "install_vllm.sh"
BUILD_SCRIPT = HERE / "build_models.py"
LOG_DIR = ENGINES_DIR / "logs"

# What the CPU build needs, and what keeps two servers on two cores from fighting over
# pinned cores. Any of these can be overridden through start_vllm(env=...).
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

DEFAULT_ARGS = (
    "--dtype",
    "float32",
    "--max-logprobs",
    "128",
    "--enable-scale-out",
    "--enable-prompt-tokens-details",
    "--enable-tokenizer-info-endpoint",
)


def ensure_vllm() -> Path:
    """Installs vLLM into its venv unless it is there already; returns its python."""
    if not VLLM_PYTHON.exists() or not (ENGINES_DIR / "vllm" / ".dualsample-installed").is_file():
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, stdout=subprocess.DEVNULL)
    return VLLM_PYTHON


def ensure_models(models_dir: Path | None = None) -> Path:
    """Builds the tiny models unless built; returns the directory holding base/, teacher/, ..."""
    target = models_dir or MODELS_DIR
    if build_models.is_built(target):
        return build_models.model_root(target)
    python = ensure_vllm()
    out = subprocess.run(
        [str(python), str(BUILD_SCRIPT), "--models-dir", str(target)],
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return Path(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _max_model_len(model_dir: Path) -> int:
    config = json.loads((model_dir / "config.json").read_text())
    return int(config["max_position_embeddings"])


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


class VllmServer:
    """A running vLLM server: ``url``, ``port``, ``pid``, ``log_path``; ``stop()`` ends it."""

    def __init__(self, proc: subprocess.Popen[bytes], port: int, model_dir: Path, log_path: Path, name: str):
        self.proc = proc
        self.port = port
        self.model_dir = model_dir
        self.log_path = log_path
        self.name = name
        self.url = f"http://127.0.0.1:{port}"
        self.startup_seconds: float | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process in its group (API server, engine core)."""
        total = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) != self.proc.pid:
                    continue
                for line in (entry / "status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
            except (OSError, ProcessLookupError, ValueError):
                continue
        return total

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server, then SIGKILL to its whole process group."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"VllmServer({self.name!r}, url={self.url!r}, pid={self.pid})"


def start_vllm(
    model_dir: str | os.PathLike[str],
    port: int | None = None,
    *extra_args: str,
    env: Mapping[str, str] | None = None,
    name: str | None = None,
    timeout: float = 300.0,
    log_path: Path | None = None,
    default_args: Sequence[str] = DEFAULT_ARGS,
    python: str | os.PathLike[str] | None = None,
) -> VllmServer:
    """Starts ``vllm.entrypoints.openai.api_server`` on 127.0.0.1 and waits for /health.

    ``port`` 0 or None picks a free port. ``extra_args`` go after ``default_args`` (so a
    repeated flag such as ``--max-logprobs`` wins; pass ``default_args=()`` for a server
    without the opt-in routes). ``--max-model-len`` defaults to the model's
    max_position_embeddings. ``name`` is the served model name (default: the directory's
    name). ``python`` runs the server (default: the venv of ``install_vllm.sh``);
    ``model_dir`` may also be a Hugging Face name, served as given (then pass
    ``--max-model-len`` yourself if the model's own is too long). On failure the
    exception carries the log's tail.
    """
    model_dir = Path(model_dir)
    # A local folder is passed absolute (the server runs elsewhere); a hub name as given.
    if model_dir.is_dir():
        model_dir = model_dir.resolve()
    python = Path(python) if python else ensure_vllm()
    port = port or free_port()
    name = name or model_dir.name
    args = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *default_args,
    ]
    if not _has_flag(extra_args, "--max-model-len") and (model_dir / "config.json").is_file():
        args += ["--max-model-len", str(_max_model_len(model_dir))]
    args += list(extra_args)

    full_env = {**os.environ, **CPU_ENV, **(env or {})}
    if log_path is None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        log_path = LOG_DIR / f"vllm-{name}-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with open(log_path, "wb") as log:
        log.write((" ".join(args) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    server = VllmServer(proc, port, model_dir, log_path, name)
    deadline = started + timeout
    while True:
        if server.healthy():
            server.startup_seconds = time.monotonic() - started
            return server
        if not server.alive():
            code = proc.returncode
            server.stop()
            raise RuntimeError(f"vLLM exited with {code} before it was healthy; {log_path}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            server.stop()
            raise TimeoutError(f"vLLM not healthy after {timeout:.0f} s; {log_path}:\n{server.log_tail()}")
        time.sleep(1.0)


def request(server: VllmServer | str, path: str, body: Any = None, timeout: float = 60.0) -> tuple[int, Any]:
    """GET (no body) or POST JSON; returns (status, parsed JSON or text), errors included."""
    url = (server if isinstance(server, str) else server.url) + path
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
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
