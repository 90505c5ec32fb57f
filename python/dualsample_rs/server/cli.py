"""`dualsample serve`: run a reference server (on aiohttp, which the client uses too)."""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import TypeVar

# whichever ArgumentParser subclass the main command line makes its subcommands with
_P = TypeVar("_P", bound=argparse.ArgumentParser)
# model.PRESETS, spelt out here so that the command line starts without importing numpy
MODELS = ["base", "teacher", "teacher-math", "base-bpe", "teacher-bpe", "base-reversed"]


def add_parser(sub: argparse._SubParsersAction[_P]) -> None:
    p = sub.add_parser("serve", help="run a vLLM- or SGLang-compatible reference server with a small real model")
    p.add_argument("--model", choices=MODELS, default="base")
    p.add_argument("--flavor", choices=["vllm", "sglang"], default="vllm", help="which engine's API to speak")
    p.add_argument("--enable-scale-out", action="store_true", help="vllm flavor: serve /inference/v1/generate")
    p.add_argument("--enable-trace-replay", action="store_true",
                   help="vllm flavor: accept trace_decode_token_ids on /inference/v1/generate")  # fmt: skip
    p.add_argument("--served-model-name", default=None, help="the model name clients must send (default: preset's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--api-key", default=None)
    p.add_argument("--max-num-queued-reqs", type=int, default=None)
    p.add_argument("--enable-tokenizer-info-endpoint", action="store_true")
    p.add_argument("--enable-prompt-tokens-details", action="store_true",
                   help="vllm flavor: report cached prompt tokens in usage (SGLang always does)")  # fmt: skip
    p.add_argument("--latency-per-position", type=float, default=0.0, metavar="SECONDS",
                   help="seconds the model is busy per position whose log probabilities it computes "
                        "(generated, scored or prompt-logprob positions), one position after another across "
                        "requests: a compute-bound engine, where each drafted position costs")  # fmt: skip
    f = p.add_argument_group("faults (rates are per request; deterministic under --fault-seed)")
    f.add_argument("--fault-seed", type=int, default=0)
    f.add_argument("--latency", type=float, default=0.0, help="seconds added to a delayed request")
    f.add_argument("--latency-rate", type=float, default=0.0)
    f.add_argument("--error-500-rate", type=float, default=0.0)
    f.add_argument("--error-503-rate", type=float, default=0.0)
    f.add_argument("--retry-after", type=float, default=1.0, help="Retry-After seconds on injected 503s")
    f.add_argument("--drop-rate", type=float, default=0.0, help="close the connection mid-response")
    f.add_argument("--malformed-rate", type=float, default=0.0, help="answer with a truncated JSON body")
    f.add_argument("--slow-body-rate", type=float, default=0.0)
    f.add_argument("--slow-body-seconds", type=float, default=1.0, help="time to trickle out a slow body")


def main(args: argparse.Namespace) -> int:
    return asyncio.run(_serve(args))


async def _serve(args: argparse.Namespace) -> int:
    from .app import ServerOptions, serve
    from .faults import FaultConfig
    from .model import load_preset
    from .process import READY_PREFIX

    faults = FaultConfig(
        seed=args.fault_seed,
        latency=args.latency,
        latency_rate=args.latency_rate,
        error_500_rate=args.error_500_rate,
        error_503_rate=args.error_503_rate,
        retry_after=args.retry_after,
        drop_rate=args.drop_rate,
        malformed_rate=args.malformed_rate,
        slow_body_rate=args.slow_body_rate,
        slow_body_seconds=args.slow_body_seconds,
    )
    options = ServerOptions(
        max_logprobs=args.max_logprobs,
        api_key=args.api_key,
        max_num_queued_reqs=args.max_num_queued_reqs,
        enable_tokenizer_info=args.enable_tokenizer_info_endpoint,
        flavor=args.flavor,
        enable_scale_out=args.enable_scale_out,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        enable_trace_replay=args.enable_trace_replay,
        faults=faults,
        latency_per_position=args.latency_per_position,
    )
    model = load_preset(args.model, max_model_len=args.max_model_len)
    if args.served_model_name:
        model.name = args.served_model_name
    task = asyncio.create_task(
        serve(model, options, args.host, args.port, ready=lambda url: print(READY_PREFIX + url, flush=True))
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await task
    except asyncio.CancelledError:
        pass
    print("dualsample serve: stopped", flush=True)
    return 0
