"""The jobs the command line runs: generate (in one process or over Ray), demo and
bench, each given its parsed flags; signals end them cleanly."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import sys
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from ..exceptions import InvalidInputError

if TYPE_CHECKING:
    from ..config.coordinator import CoordinatorConfig
    from ..engine.sequence import WorkItem
    from ..io.input_file import InputRecord


def _check_paths(inp: str, out: str, directory: bool = False) -> None:
    """Refuse paths that cannot work, before any file is touched or server contacted.
    `directory`: the output is a directory (Parquet written by Ray)."""
    if not os.path.exists(inp):
        raise InvalidInputError(f"--input: {inp} does not exist")
    if os.path.isdir(inp):
        raise InvalidInputError(f"--input: {inp} is a directory")
    if not os.access(inp, os.R_OK):
        raise InvalidInputError(f"--input: {inp} is not readable")
    if os.path.isdir(out) and not directory:
        raise InvalidInputError(f"--output: {out} is a directory")
    if os.path.exists(out) and not os.path.isdir(out) and directory:
        raise InvalidInputError(f"--output: {out} is a file; Parquet output with --ray is a directory")
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise InvalidInputError(f"--output: the directory {parent} does not exist")
    if os.path.exists(out):
        if os.path.samefile(inp, out):
            raise InvalidInputError(f"--output: {out} is the input file; writing it would destroy the prompts")
        if not os.access(out, os.W_OK):
            raise InvalidInputError(f"--output: {out} is not writable")
    elif not os.access(parent, os.W_OK):
        raise InvalidInputError(f"--output: cannot create files in {parent}")


def _check_generate(args: argparse.Namespace) -> None:
    """Every check of a generate run that needs no server, the same with or without
    Ray: flags, paths, and the rules for an existing output. (The settings were checked
    when the config was built from the flags.)"""
    if args.max_tokens < 1:
        raise InvalidInputError(f"--max-tokens: must be at least 1, got {args.max_tokens}")
    if args.retry_errors and not args.resume:
        raise InvalidInputError("--retry-errors: only with --resume")
    if args.verify_prompt_logprobs and not args.speculate:
        raise InvalidInputError("--verify-prompt-logprobs: only with --speculate")
    parquet_dir = args.ray is not None and args.output.endswith(".parquet")
    _check_paths(args.input, args.output, directory=parquet_dir)
    if parquet_dir and os.path.isdir(args.output) and os.listdir(args.output):
        if not args.overwrite:
            raise InvalidInputError(f"--output: {args.output} exists and is not empty; pass --overwrite to replace it")
        others = [f for f in os.listdir(args.output) if not f.endswith(".parquet")]
        if others:
            raise InvalidInputError(
                f"--output: {args.output} holds files that are not Parquet ({others[:3]}); not replacing it"
            )
    elif os.path.isfile(args.output) and os.path.getsize(args.output) > 0 and not (args.resume or args.overwrite):
        raise InvalidInputError(f"--output: {args.output} exists; pass --resume to continue it or --overwrite")


async def run_generate(args: argparse.Namespace, config: CoordinatorConfig) -> int:
    """``dualsample generate`` in this process: records appended as sequences finish
    (one JSON line each, or Parquet row groups when the output ends in ``.parquet``)."""
    from ..engine.coordinator import Coordinator
    from ..io.input_file import Fields, check_input, read_input
    from ..io.output_file import OutputLock, prepare_resume, scan_output

    _check_generate(args)
    parquet = args.output.endswith(".parquet")
    if parquet:
        from ..io import parquet_file

        parquet_file.require_pyarrow()
    with OutputLock(args.output):
        scan = parquet_file.scan_parquet if parquet else scan_output
        existing = scan(args.output, args.retry_errors) if args.resume else None
        _, remaining = check_input(
            args.input, args.prompt_field, args.teacher_prompt_field, existing.done if existing else None
        )
        # The id column's type needs every id before the first row group (one schema per file).
        kind = parquet_file.id_kind(r.id for r in read_input(args.input, args.prompt_field)) if parquet else ""
        fields = Fields.of(config.teachers, args.teacher_field) if config.teachers else None
        items = (
            work_item(r, args.teacher_chat)
            for r in read_input(args.input, args.prompt_field, args.teacher_prompt_field, fields)
            if existing is None or not existing.is_done(r.id)
        )
        failed = 0
        async with Coordinator(config) as coord:
            for name, problem in coord.speculation_off.items():
                # Asked for by name: said where it is seen, before the progress bar, and
                # again in the summary.
                print(f"dualsample generate: --speculate is off{f' for teacher {name!r}' if name else ''}, one "
                      f"token per step: {problem}", file=sys.stderr)  # fmt: skip
            writer: Any
            if parquet:
                # The schema follows the settings, known once the servers have answered
                # (whether speculation runs at all).
                schema = parquet_file.run_schema(config, bool(coord.speculate), kind)
                if args.resume:
                    parquet_file.check_resumable(args.output, schema)
            # The servers are up: only now is the existing output changed.
            if existing is not None:
                prepare = parquet_file.prepare_parquet_resume if parquet else prepare_resume
                prepare(args.output, existing, args.retry_errors)
            writer = _open_writer(args, schema if parquet else None)
            # A Parquet row group is also written when it is old enough, between records.
            ticker = asyncio.create_task(_flush_when_due(writer)) if parquet else None
            try:
                with writer:
                    async for _, out in coord.iter_generate(
                        items, args.max_tokens, 1.0, args.diagnostics, not args.quiet, total=remaining
                    ):
                        writer.write(out.to_record())
                        failed += out.failed
            finally:
                if ticker is not None:
                    ticker.cancel()
            stats = coord.get_statistics()
    print(
        f"dualsample generate: {stats['sequences']} sequences ({failed} failed), {stats['total_tokens']} tokens, "
        f"{stats['tokens_per_second']:.0f} tokens/s, mean alpha {stats['mean_alpha']:.3f}, "
        f"{stats['retries']} retries, {stats['stability_fallbacks']} stability fallbacks",
        file=sys.stderr,
    )
    if stats["rounds"]:
        print(f"dualsample generate: {_speculation_line(stats)}", file=sys.stderr)
    elif config.run.speculate:
        print("dualsample generate: speculation: off, one token per step (see why above)", file=sys.stderr)
    return 1 if failed else 0


async def run_gateway(args: argparse.Namespace, config: CoordinatorConfig) -> int:
    """``dualsample gateway``: serve until stopped by a signal."""
    try:
        from ..gateway import GatewayOptions, Limits, serve
    except ImportError as err:
        raise InvalidInputError(
            f"gateway: the gateway extra is not installed ({err.name} is missing; pip install 'dualsample_rs[gateway]')"
        ) from None

    if not 0 <= args.port < 65536:
        raise InvalidInputError(f"--port: must be in [0, 65535], got {args.port}")
    for name, least in (("max_queued", 0), ("max_concurrent_requests", 1), ("max_logprobs", 0),
                        ("stream_interval", 1)):  # fmt: skip
        value = getattr(args, name)
        if value is not None and value < least:
            raise InvalidInputError(f"--{name.replace('_', '-')}: must be at least {least}, got {value}")
    for path in args.passthrough:
        if not path.startswith("/"):
            raise InvalidInputError(f"--passthrough: a path starts with '/', got {path!r}")
    options = GatewayOptions(
        max_concurrent_requests=args.max_concurrent_requests,
        limits=Limits(max_logprobs=args.max_logprobs),
        stream_interval=args.stream_interval,
    )
    await serve(config, args.host, args.port, args.passthrough, options=options, teacher_system=args.teacher_system,
                max_queued_requests=args.max_queued)  # fmt: skip
    return 0


def work_item(r: InputRecord, teacher_chat: bool) -> WorkItem:
    """What to generate for one line of the input."""
    from ..engine.sequence import WorkItem, stable_key

    return WorkItem(stable_key(r.id), r.prompt, r.teacher_prompt, r.id, teacher_chat, f"line {r.line}", r.teacher,
                    r.teacher_prompts, r.mix)  # fmt: skip


def _open_writer(args: argparse.Namespace, schema: Any) -> Any:
    """The output's writer: Parquet row groups for a ``.parquet`` output, else JSON lines."""
    if schema is not None:
        from ..io.parquet_file import ParquetRecordWriter

        return ParquetRecordWriter(args.output, schema, append=args.resume)
    from ..io.output_file import RecordWriter

    return RecordWriter(args.output, append=args.resume)


async def _flush_when_due(writer: Any) -> None:
    while True:
        await asyncio.sleep(1.0)
        writer.flush_if_due()


def _speculation_line(stats: dict[str, Any]) -> str:
    line = (
        f"speculation: {stats['rounds']} rounds, {stats['tokens_per_round']:.2f} tokens per round, "
        f"acceptance rate {stats['acceptance_rate']:.2f}, {stats['requests_per_token']:.2f} requests per token"
    )
    modes = stats.get("mode_rounds", {})
    if any(modes.values()):  # --speculate auto: how its rounds split
        line += f"; auto: {modes['drafting']} batch rounds drafting, {modes['one_token']} one token per step"
    return line


# Seconds allowed to reach a Ray cluster's address before giving up (Ray itself retries
# for minutes, deaf to signals).
RAY_CONNECT_TIMEOUT = 10.0
_RAY_ADDRESS = re.compile(r"^(ray://)?(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})$")


def _ray_address(address: str) -> str | None:
    """What ``ray.init(address=...)`` takes (None: start a local cluster), after checking
    that an address is well formed and that something listens there."""
    if address == "local":
        return None
    if address == "auto":
        return address
    m = _RAY_ADDRESS.match(address)
    if m is None:
        raise InvalidInputError(f"--ray: expected nothing, auto, HOST:PORT or ray://HOST:PORT, got {address!r}")
    host, port = m.group(2).strip("[]"), int(m.group(3))
    try:
        socket.create_connection((host, port), timeout=RAY_CONNECT_TIMEOUT).close()
    except OSError as err:
        raise InvalidInputError(
            f"--ray: no Ray cluster answers at {address} (waited up to {RAY_CONNECT_TIMEOUT:.0f} s): "
            f"{err.strerror or err}"
        ) from None
    return address


class _Stopped(BaseException):
    """SIGINT or SIGTERM arrived during a Ray run."""

    def __init__(self, sig: int) -> None:
        super().__init__(sig)
        self.sig = sig


def run_ray(args: argparse.Namespace, config: CoordinatorConfig) -> int:
    """The same job over Ray Data: input read by Ray, batches mapped by `DualSample`
    actors; JSONL written here as the records stream back (the same lines a single
    process writes), Parquet written by Ray. It runs outside any event loop, so that
    SIGINT and SIGTERM reach it while Ray blocks; a stopped JSONL run ends on a whole
    line, and ``--resume`` without Ray completes it."""
    _check_generate(args)
    if args.resume:
        raise InvalidInputError("--ray: --resume is not supported; resume without --ray (same records)")
    if args.ray_actors < 1 or args.ray_batch_size < 1:
        raise InvalidInputError("--ray-actors and --ray-batch-size: must be at least 1")
    try:
        import ray
    except ImportError:
        raise InvalidInputError("--ray: the ray extra is not installed (pip install 'dualsample_rs[ray]')") from None
    from ..io.input_file import check_input
    from ..io.output_file import OutputLock

    address = _ray_address(args.ray)

    def stop(sig: int, _frame: object) -> None:
        raise _Stopped(sig)

    def take_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    take_signals()
    try:
        with OutputLock(args.output):
            check_input(args.input, args.prompt_field, args.teacher_prompt_field, require_id=True)
            if address is None:
                ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
            else:
                ray.init(address=address, log_to_driver=False)
            take_signals()  # Ray's driver installs handlers of its own
            try:
                return _ray_job(args, config, ray)
            finally:
                ray.shutdown()
    except _Stopped as stopped:
        name = signal.Signals(stopped.sig).name
        done = "what was written is complete (--resume without --ray continues)"
        if args.output.endswith(".parquet"):
            done = "the Parquet directory is incomplete"
        print(f"dualsample generate: stopped by {name}; {done}", file=sys.stderr)
        return 128 + stopped.sig
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _ray_job(args: argparse.Namespace, config: CoordinatorConfig, ray: Any) -> int:
    from ..io.output_file import RecordWriter
    from ..ray import DualSample, record_from_row

    kwargs = {"config": config, "max_tokens": args.max_tokens, "teacher_chat": args.teacher_chat,
              "diagnostics": args.diagnostics, "prompt_field": args.prompt_field,
              "teacher_field": args.teacher_prompt_field, "actors": args.ray_actors,
              "route_field": args.teacher_field}  # fmt: skip
    mapped = ray.data.read_json(args.input).map_batches(
        DualSample, fn_constructor_kwargs=kwargs, concurrency=args.ray_actors, batch_size=args.ray_batch_size,
        num_cpus=0.25,  # the actors wait on servers; do not reserve a core each
    )  # fmt: skip
    if args.output.endswith(".parquet"):
        if os.path.isdir(args.output):  # checked: only Parquet files, and --overwrite given
            for name in os.listdir(args.output):
                os.remove(os.path.join(args.output, name))
        mapped.write_parquet(args.output)
        return 0
    failed = 0
    with RecordWriter(args.output, append=False) as writer:
        for row in mapped.iter_rows():
            record = record_from_row(row)
            writer.write(record)
            failed += record["finish_reason"] == "error"
    return 1 if failed else 0


DEMO_QUESTIONS = [
    "Why is the sky blue?",
    "What is water made of?",
    "How do plants make food?",
    "What does the heart do?",
    "Why is the ocean salty?",
    "What causes wind?",
    "Why does ice float?",
    "What makes thunder?",
]


async def run_demo(args: argparse.Namespace) -> int:
    """``dualsample demo``: two reference servers, a few questions, samples printed."""
    from ..config.coordinator import CoordinatorConfig
    from ..engine.coordinator import Coordinator
    from ..server import running_server

    flavor: dict[str, Any] = (
        {"flavor": "sglang"}
        if args.dialect == "sglang"
        else {"enable_scale_out": True, "enable_trace_replay": True, "max_logprobs": 64}
    )
    print(f"starting the reference servers as {args.dialect} (base: plain prose, teacher: chat) ...", flush=True)
    with running_server("base", **flavor) as theta_url, running_server("teacher", **flavor) as t_url:
        config = CoordinatorConfig(theta_url=theta_url, t_url=t_url, seed=args.seed, exclude_special_tokens=True,
                                   dialect=args.dialect, scoring=args.scoring, speculate=args.speculate)  # fmt: skip
        async with Coordinator(config) as coord:
            plain = [f"Question: {q}\nAnswer:" for q in DEMO_QUESTIONS]
            # the teacher's server renders each question in its chat template
            outs = await coord.generate_batch_dual_prompts(
                plain, DEMO_QUESTIONS, max_tokens=args.max_tokens, return_diagnostics=True, teacher_chat=True
            )
            stats = coord.get_statistics()
    for out in outs[: args.samples]:
        alphas = out.alpha_history
        print(f"\n--- {out.prompt_t!r}")
        print(f"base prompt {out.prompt!r}, teacher prompt: the question in the teacher's chat template")
        print(f"sample: {out.generated_text!r}")
        print(
            f"{len(out.token_ids)} tokens, finish {out.finish_reason}, alpha first {alphas[0]:.2f} then mean "
            f"{sum(alphas[1:]) / max(1, len(alphas) - 1):.3f}; sum log q* {sum(out.logq):.2f}, "
            f"sum log pi_theta {sum(out.logp_theta):.2f}, sum log pi_t {sum(out.logp_t):.2f}"
        )
    print(
        f"\nsummary: {stats['sequences']} sequences, {stats['total_tokens']} tokens, "
        f"{stats['tokens_per_second']:.0f} tokens/s, "
        f"mean alpha {stats['mean_alpha']:.3f}, {stats['stability_fallbacks']} stability fallbacks, "
        f"{stats['errors']} errors, {stats['total_requests']} requests"
    )
    if stats["rounds"]:
        print(_speculation_line(stats))
    return 1 if stats["errors"] else 0


async def run_bench(args: argparse.Namespace) -> int:
    """``dualsample bench``: the Rust step against the numpy reference."""
    import time

    from .. import _core, reference
    from ..synthetic import topk_pair

    data = topk_pair(args.rows, args.k, vocab=8192, seed=0)
    config = _core.SamplerConfig()
    _, a, b = _core.merge_topk(*data)

    def timed(fn: Any) -> float:
        fn()
        best = float("inf")
        for _ in range(max(1, args.repeat)):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    rows = [
        ("step", timed(lambda: _core.step(*data, config=config)), timed(lambda: reference.step(*data, config=config))),
        ("solve_alpha", timed(lambda: _core.solve_alpha(a, b)), timed(lambda: reference.solve_alpha(a, b))),
    ]
    threads = os.environ.get("RAYON_NUM_THREADS", "all")
    print(f"{args.rows} rows x k={args.k}, best of {args.repeat}, Rust threads: {threads}")
    print(f"build: {_core.build_profile}")
    print(f"{'call':<12} {'Rust µs/row':>12} {'numpy µs/row':>13} {'ratio':>7}")
    for name, fast, slow in rows:
        per = 1e6 / args.rows
        print(f"{name:<12} {fast * per:>12.2f} {slow * per:>13.2f} {slow / fast:>6.1f}x")
    return 0


async def stoppable(command: str, work: Coroutine[Any, Any, int]) -> int:
    """Run `work`; on SIGINT or SIGTERM cancel it, so that the record being written is
    finished, files are closed and locks released, then exit 128 + the signal number."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def stop(sig: int) -> None:
        received.append(sig)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    try:
        return await work
    except asyncio.CancelledError:
        if not received:
            raise
        name = signal.Signals(received[0]).name
        print(f"dualsample {command}: stopped by {name}; what was written is complete (--resume continues)",
              file=sys.stderr)  # fmt: skip
        return 128 + received[0]
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
