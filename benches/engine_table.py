"""q* tokens/s on real engines next to each model's plain generation, in one run.

``make bench-engines`` runs this after ``make test-engines``' installs (the same venvs,
the same tiny Qwen2 models, the same server starters in ``tests/engines/``). For each
engine it starts a base and a teacher server as the engine tests do, then measures:

- plain generation of each model alone (the other server idle): one batched request of
  P prompts x T tokens, sampling with top-k 20 and ``ignore_eos`` so that every prompt
  gives exactly T tokens; once without log probabilities and once with 20 per token
  (vLLM ``/v1/completions`` ``logprobs: 20``, SGLang ``/generate`` ``return_logprob`` with
  ``top_logprobs_num: 20``: what a user asking for them gets). Best of 3 after a warm-up
  request, as one request is one to three seconds here and the machine is shared;
- q* through a whole ``dualsample generate`` run (a subprocess: start-up, handshake,
  ``/tokenize`` per prompt and server, the steps, ``/detokenize``, writing records) over
  the same prompts and pair, ``--max-tokens T`` with no stop ids (so it also makes P x T
  tokens), ``--top-k 20``: one token per step on every route the engine serves, and
  speculative rounds (K = 4 and ``auto``) where the engine allows them (SGLang; vLLM's CPU
  build only through ``--verify-prompt-logprobs``, as trace replay does not start there);
- each q* figure as a ratio to the slower model's plain generation, without and with log
  probabilities; the load average beside every figure; each server's command line, and
  the counters of its ``/metrics`` that moved during each phase (requests, prompt
  tokens computed and cached).

The base's prompts are "Question: ...\\nAnswer:" texts, the teacher's the same questions
in its chat template (``--teacher-chat``); the plain requests send the very ids the
package's own backends tokenize those into.

Sizes and targets come from the environment, so the same script runs on a GPU machine:

=================================  ==========================================================
``DUALSAMPLE_BENCH_ENGINES``        engines to run, comma-separated (``vllm,sglang``)
``DUALSAMPLE_BENCH_PROMPTS``        P (64; 8 with ``--small``)
``DUALSAMPLE_BENCH_TOKENS``         T (64; 8 with ``--small``)
``DUALSAMPLE_BENCH_SMALL``          ``1``: the ``--small`` sizes (a smoke test of every path)
``DUALSAMPLE_BENCH_BASE``           base model: a folder or a Hugging Face name (the tiny
                                    ``base/`` of ``tests/engines/build_models.py``)
``DUALSAMPLE_BENCH_TEACHER``        teacher model, likewise (the tiny ``teacher/``)
``DUALSAMPLE_BENCH_VLLM_PYTHON``    the interpreter that runs vLLM (the test venv's)
``DUALSAMPLE_BENCH_SGLANG_PYTHON``  the interpreter that runs SGLang (the test venv's)
``DUALSAMPLE_BENCH_DEVICE``         ``cpu`` (default) or ``gpu``: ``gpu`` drops SGLang's CPU
                                    flags, environment and ``sgl_kernel`` stub, and vLLM's
                                    ``--dtype float32``
``DUALSAMPLE_BENCH_VLLM_ARGS``      extra vLLM server flags (shell words), after the defaults
``DUALSAMPLE_BENCH_SGLANG_ARGS``    extra SGLang server flags, after the defaults
``DUALSAMPLE_BENCH_TOP_K``          log probabilities per position, plain and q* (20)
``DUALSAMPLE_BENCH_MODES``          only the q* runs whose label contains one of these words
                                    (comma-separated, e.g. ``1 token``; all)
``DUALSAMPLE_BENCH_REPEATS``        plain requests timed per figure, best taken (3; 1 small)
``DUALSAMPLE_BENCH_PYSPY``          a folder: after the table, run plain generation with
                                    log probabilities and q* one token per step again
                                    under ``py-spy record --subprocesses`` on the base's
                                    server and write raw stacks and a summary there
                                    (those runs are slowed by the profiler; their
                                    figures are printed apart and marked so)
``DUALSAMPLE_BENCH_JSON``           where to write every figure as JSON
                                    (``target/bench-engines.json``)
``DUALSAMPLE_BENCH_PREVIOUS``       an earlier build's ``dualsample_rs`` package folder
                                    (``make previous`` leaves one; ``make bench-engines``
                                    passes it when present): each q* run is made with it
                                    too, right after this build's, on the same servers,
                                    and the table gives the two side by side
=================================  ==========================================================

``python benches/engine_table.py --summarize FILE`` prints the top frames of a raw
py-spy file.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "engines"))

import sglang_engine  # noqa: E402 (the engine helpers live beside the engine tests)
import vllm_engine  # noqa: E402
from dualsample_rs import SGLangBackend, VLLMCompletionsBackend  # noqa: E402
from dualsample_rs.cli.jobs import DEMO_QUESTIONS  # noqa: E402

PY_SPY = Path(sys.executable).parent / "py-spy"


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def load() -> str:
    return f"{os.getloadavg()[0]:.2f}"


# --------------------------------------------------------------------------- servers
@contextlib.contextmanager
def servers(engine: str, base: str, teacher: str, device: str) -> Iterator[tuple[Any, Any, list[str]]]:
    """Base and teacher servers, started at once (each start is 1-2 minutes here)."""
    extra = shlex.split(os.environ.get(f"DUALSAMPLE_BENCH_{engine.upper()}_ARGS", ""))
    python = os.environ.get(f"DUALSAMPLE_BENCH_{engine.upper()}_PYTHON") or None
    started: list[Any] = []
    try:
        if engine == "vllm":
            # start_vllm waits for /health; two threads let both servers warm up together.
            from concurrent.futures import ThreadPoolExecutor

            # float32 is for the tiny models on CPU; on a GPU the model's own dtype.
            defaults = vllm_engine.DEFAULT_ARGS
            if device != "cpu":
                defaults = tuple(a for a in defaults if a not in ("--dtype", "float32"))
            hub_env = {k: os.environ[k] for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
            with ThreadPoolExecutor(2) as pool:
                futures = [
                    pool.submit(
                        vllm_engine.start_vllm,
                        m,
                        0,
                        *extra,
                        name=n,
                        default_args=defaults,
                        python=python,
                        env=hub_env,
                        timeout=900,
                    )
                    for m, n in ((base, "base"), (teacher, "teacher"))
                ]
                for f in futures:
                    with contextlib.suppress(Exception):
                        started.append(f.result())
                for f in futures:
                    f.result()  # raises the first failure, once both have settled
            # The environment changes what the CPU build runs (e.g. the executor), so it
            # is part of the flags.
            env = {**{k: v for k, v in os.environ.items() if k.startswith("VLLM_")}, **vllm_engine.CPU_ENV}
            shown = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(("VLLM_", "OMP_")))
            flags = [shown + " " + Path(s.log_path).read_text(errors="replace").splitlines()[0] for s in started]
        else:
            args = ["--enable-metrics", *extra]
            cpu = device == "cpu"
            for m in (base, teacher):
                started.append(sglang_engine.start_sglang(m, 0, *args, wait=False, python=python, cpu=cpu))
            for s in started:
                s.wait_ready(900)
            shown = " ".join(f"{k}={v}" for k, v in sorted(sglang_engine.CPU_ENV.items())) + " " if cpu else ""
            flags = [shown + " ".join(s.argv) for s in started]
        yield started[0], started[1], flags
    finally:
        for s in started:
            s.stop()


# --------------------------------------------------------------------------- prompts
def prompts(n: int) -> tuple[list[str], list[str]]:
    questions = [DEMO_QUESTIONS[i % len(DEMO_QUESTIONS)] for i in range(n)]
    return [f"Question: {q}\nAnswer:" for q in questions], questions


async def _ids(
    engine: str, base_url: str, teacher_url: str, plain: list[str], questions: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """The ids the coordinator sends each server (the base's text, the teacher's chat)."""
    cls = SGLangBackend if engine == "sglang" else VLLMCompletionsBackend
    async with cls(base_url) as b, cls(teacher_url) as t:
        base_ids = await asyncio.gather(*(b.tokenize(p) for p in plain))
        teacher_ids = await asyncio.gather(*(t.tokenize(messages=[{"role": "user", "content": q}]) for q in questions))
    return list(base_ids), list(teacher_ids)


# --------------------------------------------------------------------------- plain generation
def post(url: str, body: Any, timeout: float = 3600.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def plain_once(
    engine: str, server: Any, model: str, ids: list[list[int]], tokens: int, top_k: int, logprobs: int
) -> tuple[float, int]:
    """One batched request: (seconds, generated tokens)."""
    if engine == "vllm":
        body: dict[str, Any] = {
            "model": model,
            "prompt": ids,
            "max_tokens": tokens,
            "temperature": 1.0,
            "top_k": top_k,
            "ignore_eos": True,
        }
        if logprobs:
            body["logprobs"] = logprobs
        t0 = time.perf_counter()
        reply = post(server.url + "/v1/completions", body)
        seconds = time.perf_counter() - t0
        return seconds, int(reply["usage"]["completion_tokens"])
    body = {
        "input_ids": ids,
        "sampling_params": {"max_new_tokens": tokens, "temperature": 1.0, "top_k": top_k, "ignore_eos": True},
    }
    if logprobs:
        body |= {"return_logprob": True, "top_logprobs_num": logprobs}
    t0 = time.perf_counter()
    reply = post(server.url + "/generate", body)
    seconds = time.perf_counter() - t0
    return seconds, sum(int(r["meta_info"]["completion_tokens"]) for r in reply)


def plain(
    engine: str, server: Any, model: str, ids: list[list[int]], tokens: int, top_k: int, logprobs: int, repeats: int
) -> dict[str, Any]:
    plain_once(engine, server, model, ids[:2], 2, top_k, logprobs)  # warm-up: the first request pays compiles
    runs = [plain_once(engine, server, model, ids, tokens, top_k, logprobs) for _ in range(repeats)]
    seconds, made = min(runs)
    assert made == len(ids) * tokens, (made, len(ids), tokens)
    return {
        "tokens": made,
        "seconds": seconds,
        "tokens_per_s": made / seconds,
        "load": load(),
        "all_seconds": [r[0] for r in runs],
    }


# --------------------------------------------------------------------------- q*
def qstar(
    base: Any,
    teacher: Any,
    plain_text: list[str],
    questions: list[str],
    tokens: int,
    top_k: int,
    args: list[str],
    work: Path,
    package: Path | None = None,
) -> dict[str, Any]:
    """A whole `dualsample generate` run; its wall time, from launch to exit. `package`:
    an earlier build's package folder to run instead of this one."""
    inp, out = work / "prompts.jsonl", work / "records.jsonl"
    inp.write_text(
        "".join(
            json.dumps({"id": i, "prompt": p, "teacher_prompt": q}) + "\n"
            for i, (p, q) in enumerate(zip(plain_text, questions, strict=True))
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "dualsample_rs",
        "generate",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--overwrite",
        "--quiet",
        "--theta-url",
        base.url,
        "--t-url",
        teacher.url,
        "--teacher-chat",
        "--max-tokens",
        str(tokens),
        "--top-k",
        str(top_k),
        "--stop-token-ids",
        "",
        *args,
    ]
    out.unlink(missing_ok=True)  # an earlier run's records must not stand for this one's
    env = None if package is None else dict(os.environ, PYTHONPATH=str(package.parent))
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        # A run whose every record failed says why in its records, not on stderr.
        why = next((r["error"] for r in _records(out) if r.get("error")), "") if out.exists() else ""
        raise RuntimeError(
            f"{shlex.join(cmd)} exited with {done.returncode}:\n{done.stderr[-3000:]}"
            + (f"\nfirst record's error: {why}" if why else "")
        )
    records = _records(out)
    errors = [r.get("error") for r in records if r.get("error")]
    made = sum(len(r.get("token_ids") or []) for r in records)
    # Speculative and auto runs say which round made each token: their tokens per round
    # (1.0 where auto chose one token per step throughout).
    rounds = sum(len(set(r["round"])) for r in records if r.get("round"))
    return {
        "tokens": made,
        "tokens_per_round": made / rounds if rounds else None,
        "seconds": seconds,
        "tokens_per_s": made / seconds,
        "load": load(),
        "records": len(records),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "warnings": [ln for ln in done.stderr.splitlines() if "warn" in ln.lower()][:3],
    }


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def modes(engine: str) -> list[tuple[str, list[str]]]:
    """(label, generate flags) per q* run on this engine, those DUALSAMPLE_BENCH_MODES
    names (words each label must contain, comma-separated: "1 token" keeps the one-token
    runs) or all."""
    wanted = [w.strip() for w in os.environ.get("DUALSAMPLE_BENCH_MODES", "").split(",") if w.strip()]
    return [m for m in _modes(engine) if not wanted or any(w in m[0] for w in wanted)]


def _modes(engine: str) -> list[tuple[str, list[str]]]:
    if engine == "vllm":
        return [
            ("q*, 1 token/step, vllm-completions", ["--dialect", "vllm-completions"]),
            ("q*, 1 token/step, vllm-generate", ["--dialect", "vllm-generate"]),
            # auto's layout: eight workers of eight sequences, each asking alone
            (
                "q*, 1 token/step, vllm-completions, batches of 8",
                ["--dialect", "vllm-completions", "--max-batch-size", "8"],
            ),
            (
                "q*, K=4, --verify-prompt-logprobs",
                ["--dialect", "vllm-completions", "--speculate", "4", "--verify-prompt-logprobs"],
            ),
            (
                "q*, auto, --verify-prompt-logprobs",
                ["--dialect", "vllm-completions", "--speculate", "auto", "--verify-prompt-logprobs"],
            ),
        ]
    return [
        ("q*, 1 token/step, sglang", ["--dialect", "sglang"]),
        ("q*, 1 token/step, sglang, batches of 8", ["--dialect", "sglang", "--max-batch-size", "8"]),  # auto's layout
        ("q*, K=4, sglang", ["--dialect", "sglang", "--speculate", "4"]),
        ("q*, auto, sglang", ["--dialect", "sglang", "--speculate", "auto"]),
    ]


# --------------------------------------------------------------------------- /metrics
# Counters that say what the engine computed: requests, prompt tokens (and those served
# from the prefix cache), generated tokens.
METRICS = re.compile(
    r"^(vllm:(?:request_success_total|prompt_tokens_total|generation_tokens_total|prefix_cache_queries_total|"
    r"prefix_cache_hits_total|prompt_tokens_cached_total|num_preemptions_total)"
    r"|sglang:(?:num_requests_total|prompt_tokens_total|generation_tokens_total|cached_tokens_total))"
    r"(\{[^}]*\})?\s+([0-9.eE+-]+)$"
)


def metrics(server: Any) -> dict[str, float]:
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=30) as r:
            text = r.read().decode(errors="replace")
    except OSError:
        return {}
    out: dict[str, float] = collections.defaultdict(float)
    for line in text.splitlines():
        m = METRICS.match(line)
        if m:
            out[m.group(1)] += float(m.group(3))  # summed over label sets (finish reasons)
    return dict(out)


@contextlib.contextmanager
def moved(servers_: dict[str, Any], into: dict[str, Any]) -> Iterator[None]:
    """The /metrics counters of each server that moved during the block, into ``into``."""
    before = {k: metrics(s) for k, s in servers_.items()}
    yield
    for k, s in servers_.items():
        after = metrics(s)
        delta = {m: after[m] - before[k].get(m, 0.0) for m in after if after[m] != before[k].get(m, 0.0)}
        if delta:
            into[k] = delta


# --------------------------------------------------------------------------- py-spy
@contextlib.contextmanager
def profiled(server: Any, path: Path) -> Iterator[None]:
    """py-spy on the server and its child processes (engine core, scheduler,
    detokenizer) for the block; raw stacks to ``path``. Only on-CPU samples are kept
    (no --idle), so the counts say where CPU goes, not where threads wait."""
    if not PY_SPY.exists():
        raise FileNotFoundError(f"{PY_SPY}: pip install py-spy into the project's venv")
    proc = subprocess.Popen(
        [
            str(PY_SPY),
            "record",
            "--pid",
            str(server.pid),
            "--subprocesses",
            "--format",
            "raw",
            "--rate",
            "50",
            "--output",
            str(path),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(2.0)  # py-spy attaches to each process before the block starts
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def summarize(path: Path, top: int = 12) -> str:
    """Per process (py-spy nests a child's stacks under its parents' ``process`` frames;
    the innermost one is the sampled process): its share of the on-CPU samples, its
    leaf frames (self time) and the frames most often on its stack (inclusive), leaving
    out those on nearly every one of its stacks (the process's start-up chain)."""
    stacks: dict[str, list[tuple[list[str], int]]] = collections.defaultdict(list)
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        procs = [f for f in frames if f.startswith("process ")]
        name = re.sub(r'^process \d+:"?', "", procs[-1]) if procs else "?"
        name = re.sub(r"^\S*/python3? ", "", name).rstrip('"')[:70]
        stacks[name].append(([f for f in frames if not f.startswith(("process ", "thread "))], int(count)))
        total += int(count)
    lines = [f"{path.name}: {total} on-CPU samples at 50 Hz (about {total / 50:.1f} CPU-seconds)"]
    ranked = sorted(stacks.items(), key=lambda kv: -sum(n for _, n in kv[1]))
    for name, entries in ranked[:4]:
        own = sum(n for _, n in entries)
        leaf: collections.Counter[str] = collections.Counter()
        inclusive: collections.Counter[str] = collections.Counter()
        for frames, n in entries:
            if frames:
                leaf[frames[-1]] += n
            for f in set(frames):
                inclusive[f] += n
        lines.append(f"\n{own / total:.1%} of the samples: {name}")
        lines.append("  self:")
        lines += [f"    {n / own:6.1%}  {f}" for f, n in leaf.most_common(top)]
        lines.append("  inclusive:")
        shown = [(f, n) for f, n in inclusive.most_common() if n < 0.95 * own][:top]
        lines += [f"    {n / own:6.1%}  {f}" for f, n in shown]
    return "\n".join(lines)


# --------------------------------------------------------------------------- one engine
def run_engine(
    engine: str,
    sizes: tuple[int, int],
    top_k: int,
    repeats: int,
    device: str,
    base_model: str,
    teacher_model: str,
    pyspy: Path | None,
    previous: Path | None = None,
) -> dict[str, Any]:
    n, tokens = sizes
    plain_text, questions = prompts(n)
    result: dict[str, Any] = {"engine": engine, "prompts": n, "tokens": tokens, "top_k": top_k, "rows": []}
    t_start = time.perf_counter()
    with (
        servers(engine, base_model, teacher_model, device) as (base, teacher, flags),
        tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp,
    ):
        result["flags"] = flags
        result["startup_s"] = time.perf_counter() - t_start
        both = {"base": base, "teacher": teacher}
        base_ids, teacher_ids = asyncio.run(_ids(engine, base.url, teacher.url, plain_text, questions))
        for who, server, ids in (("base", base, base_ids), ("teacher", teacher, teacher_ids)):
            for lp in (0, top_k):
                row: dict[str, Any] = {"what": f"plain {who}" + (f", {lp} logprobs" if lp else ""), "metrics": {}}
                with moved({who: server}, row["metrics"]):
                    row |= plain(
                        engine, server, server.name if engine == "vllm" else "", ids, tokens, top_k, lp, repeats
                    )
                row["kind"], row["logprobs"] = "plain", lp
                result["rows"].append(row)
                print(
                    f"  {engine}: {row['what']}: {row['tokens_per_s']:,.0f} tokens/s (load {row['load']})", flush=True
                )
        for label, args in modes(engine):
            # This build, then the earlier one (when given) on the same servers right after.
            for package in (None, previous) if previous is not None else (None,):
                what = label if package is None else f"{label} [previous]"
                row = {"what": what, "kind": "q*", "args": args, "metrics": {}, "previous": package is not None}
                try:
                    with moved(both, row["metrics"]):
                        row |= qstar(base, teacher, plain_text, questions, tokens, top_k, args, Path(tmp), package)
                    print(
                        f"  {engine}: {what}: {row['tokens_per_s']:,.1f} tokens/s in {row['seconds']:.1f} s "
                        f"(load {row['load']}, errors {row['errors']}"
                        + (f", {row['tokens_per_round']:.2f} tokens per round" if row.get("tokens_per_round") else "")
                        + ")",
                        flush=True,
                    )
                except RuntimeError as err:
                    row["failed"] = str(err).splitlines()[-1][:300]
                    print(f"  {engine}: {what}: failed: {row['failed']}", flush=True)
                result["rows"].append(row)
        if pyspy is not None:
            pyspy.mkdir(parents=True, exist_ok=True)
            result["profiles"] = []
            for what, fn in (
                (
                    "plain base, logprobs",
                    lambda: plain(
                        engine, base, base.name if engine == "vllm" else "", base_ids, tokens, top_k, top_k, 1
                    ),
                ),
                (
                    "q*, 1 token/step",
                    lambda: qstar(base, teacher, plain_text, questions, tokens, top_k, _modes(engine)[0][1], Path(tmp)),
                ),
            ):
                path = pyspy / f"{engine}-{what.split(',')[0].replace(' ', '-').replace('*', 'star')}.txt"
                with profiled(base, path):
                    got = fn()
                got |= {"what": f"{what} (under py-spy)", "file": str(path)}
                result["profiles"].append(got)
                (path.with_suffix(".summary.txt")).write_text(summarize(path) + "\n")
                print(
                    f"  {engine}: {got['what']}: {got['tokens_per_s']:,.1f} tokens/s (load {got['load']}); {path}",
                    flush=True,
                )
    result["total_s"] = time.perf_counter() - t_start
    return result


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    plain_rows = [r for r in rows if r["kind"] == "plain"]
    slower = min((r for r in plain_rows if not r["logprobs"]), key=lambda r: r["tokens_per_s"])
    slower_lp = min((r for r in plain_rows if r["logprobs"]), key=lambda r: r["tokens_per_s"])
    out = [
        f"### {result['engine']}: {result['prompts']} prompts x {result['tokens']} tokens, top-k {result['top_k']} "
        f"(servers up in {result['startup_s']:.0f} s, engine total {result['total_s']:.0f} s)",
        "",
        "| run | tokens | seconds | tokens/s | / slower plain | / slower plain with logprobs | / previous build "
        "| load (1 min) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    earlier = {r["what"]: r for r in rows if r.get("previous") and "failed" not in r}
    for r in rows:
        if "failed" in r:
            out.append(f"| {r['what']} | failed: {r['failed']} | | | | | | |")
            continue
        ratio = lp_ratio = against = ""
        if r["kind"] == "q*":
            ratio = f"{r['tokens_per_s'] / slower['tokens_per_s']:.3f}"
            lp_ratio = f"{r['tokens_per_s'] / slower_lp['tokens_per_s']:.3f}"
            then = earlier.get(f"{r['what']} [previous]")
            if then is not None:
                against = f"{r['tokens_per_s'] / then['tokens_per_s']:.2f}"
        note = f" ({r['errors']} errors)" if r.get("errors") else ""
        out.append(
            f"| {r['what']}{note} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:,.1f} | {ratio} "
            f"| {lp_ratio} | {against} | {r['load']} |"
        )
    out += ["", f"slower plain: {slower['what']}; slower plain with logprobs: {slower_lp['what']}", "", "server flags:"]
    out += [f"    {f}" for f in result["flags"]]
    out += ["", "/metrics counters moved per run:"]
    for r in rows:
        for who, delta in r.get("metrics", {}).items():
            shown = ", ".join(f"{k.split(':', 1)[1]} {v:,.0f}" for k, v in sorted(delta.items()))
            out.append(f"    {r['what']} [{who}]: {shown}")
    for p in result.get("profiles", []):
        out.append(f"profiled: {p['what']}: {p['tokens_per_s']:,.1f} tokens/s (load {p['load']}), {p['file']}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", "--benchmark-disable", action="store_true", help="8 prompts x 8 tokens, 1 repeat")
    parser.add_argument("--summarize", type=Path, help="print the top frames of a raw py-spy file and exit")
    args = parser.parse_args()
    if args.summarize:
        print(summarize(args.summarize))
        return
    small = args.small or os.environ.get("DUALSAMPLE_BENCH_SMALL") == "1"
    sizes = (
        env_int("DUALSAMPLE_BENCH_PROMPTS", 8 if small else 64),
        env_int("DUALSAMPLE_BENCH_TOKENS", 8 if small else 64),
    )
    repeats = env_int("DUALSAMPLE_BENCH_REPEATS", 1 if small else 3)
    top_k = env_int("DUALSAMPLE_BENCH_TOP_K", 20)
    device = os.environ.get("DUALSAMPLE_BENCH_DEVICE", "cpu")
    engines = [e.strip() for e in os.environ.get("DUALSAMPLE_BENCH_ENGINES", "vllm,sglang").split(",") if e.strip()]
    base_model, teacher_model = os.environ.get("DUALSAMPLE_BENCH_BASE"), os.environ.get("DUALSAMPLE_BENCH_TEACHER")
    if not (base_model and teacher_model):
        root = vllm_engine.ensure_models()
        base_model, teacher_model = base_model or str(root / "base"), teacher_model or str(root / "teacher")
    pyspy = Path(os.environ["DUALSAMPLE_BENCH_PYSPY"]) if os.environ.get("DUALSAMPLE_BENCH_PYSPY") else None
    json_path = Path(os.environ.get("DUALSAMPLE_BENCH_JSON") or ROOT / "target" / "bench-engines.json")
    previous = Path(os.environ["DUALSAMPLE_BENCH_PREVIOUS"]) if os.environ.get("DUALSAMPLE_BENCH_PREVIOUS") else None
    if previous is not None and not (previous / "__init__.py").is_file():
        raise SystemExit(f"DUALSAMPLE_BENCH_PREVIOUS: {previous} is not a dualsample_rs package folder")
    print(
        f"bench-engines: {engines}, {sizes[0]} prompts x {sizes[1]} tokens, base {base_model}, teacher "
        f"{teacher_model}, {os.cpu_count()} CPUs, load {load()}",
        flush=True,
    )
    t0 = time.perf_counter()
    results = []
    for engine in engines:
        results.append(run_engine(engine, sizes, top_k, repeats, device, base_model, teacher_model, pyspy, previous))
    print()
    for r in results:
        print(table(r) + "\n")
    print(f"whole run: {time.perf_counter() - t0:.0f} s; load {load()}")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"figures: {json_path}")
    if shutil.which("uptime"):
        subprocess.run(["uptime"], check=False)


if __name__ == "__main__":
    main()
