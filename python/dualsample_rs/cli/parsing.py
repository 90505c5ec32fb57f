"""The `dualsample` command's arguments: parsing only; jobs.py and the subpackages do the work."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any, NoReturn, get_args

from .. import export, report
from .._core import __version__
from ..config.coordinator import (
    DIALECT_NAMES,
    SETTINGS,
    CoordinatorConfig,
    Scoring,
    mix_text,
    speculate_text,
    teacher_text,
)
from ..config.declare import Setting, help_text, scalar_type
from ..exceptions import ConfigurationError, DualSampleError
from ..server import cli as serve_cli
from . import jobs


class _Parser(argparse.ArgumentParser):
    """Flag errors in one line (the full usage is a screenful), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flagged() -> list[Setting]:
    return [s for s in SETTINGS if s.flag is not None]


def _add_flag(group: Any, s: Setting) -> None:
    """A setting's flag, all of it from the setting's declaration."""
    assert s.flag is not None
    kwargs: dict[str, Any] = {"help": help_text(s)}
    if s.hint is bool:
        kwargs["action"] = "store_true"
    else:
        parse, choices = scalar_type(s.hint) if s.flag.text is None else (s.flag.text, None)
        kwargs.update(type=parse, default=s.flag_default())
        if choices is not None:
            kwargs["choices"] = list(choices)
        if s.flag.metavar is not None:
            kwargs["metavar"] = s.flag.metavar
        if s.flag.repeat:
            kwargs["action"] = "append"
    group.add_argument(s.flag.name, **kwargs)


def _setting_flags(p: argparse.ArgumentParser, generate: bool = True) -> None:
    groups = {"sampling": p.add_argument_group("sampling"), "servers": p.add_argument_group("servers")}
    added: set[str] = set()
    for s in _flagged():
        assert s.flag is not None
        if s.flag.name not in added:  # a flag that sets several settings is declared by the first
            added.add(s.flag.name)
            _add_flag(groups[s.flag.group], s)
    sampling = groups["sampling"]
    if generate:
        sampling.add_argument("--max-tokens", type=int, default=100)
        sampling.add_argument("--diagnostics", action="store_true", help="add per-sequence divergence summaries")


def config_from_args(args: argparse.Namespace) -> CoordinatorConfig:
    """The settings ``dualsample generate``'s flags give."""
    values = {s.name: s.from_flag(getattr(args, s.flag.dest)) for s in _flagged() if s.flag is not None}
    # a batch is never larger than what may be in flight
    values["max_batch_size"] = min(values["max_batch_size"], values["max_concurrency"])
    teachers = getattr(args, "teacher", None)
    if teachers:
        if args.t_url is not None:
            raise ConfigurationError("--teacher: give named teachers (--teacher NAME=URL) or --t-url, not both")
        values |= {"teachers": dict(teachers), "default_teacher": args.default_teacher, "mix": args.mix}
    elif args.default_teacher is not None or args.mix is not None:
        flag = "--default-teacher" if args.default_teacher is not None else "--mix"
        raise ConfigurationError(f"{flag}: only with named teachers (--teacher NAME=URL)")
    return CoordinatorConfig(**values)


def _generate_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("generate", help="sample from q* for every prompt of a JSONL file")
    p.add_argument("--input", required=True, help="JSONL: id, prompt, optional teacher_prompt")
    p.add_argument("--output", required=True, help="JSONL records, appended as sequences finish")
    p.add_argument("--resume", action="store_true", help="skip ids already in --output")
    p.add_argument("--retry-errors", action="store_true", help="with --resume: generate failed records again")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--prompt-field", default="prompt")
    p.add_argument("--teacher-prompt-field", default="teacher_prompt")
    p.add_argument("--teacher-chat", action="store_true", help="teacher prompt = prompt in the teacher's chat template")
    t = _teacher_flags(p)
    t.add_argument("--teacher-field", default="teacher", help="the input field naming a line's teacher")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    r = p.add_argument_group("Ray (the ray extra)")
    r.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run over a Ray cluster (alone: a local one); output *.parquet is a directory")  # fmt: skip
    r.add_argument("--ray-actors", type=int, default=2, help="actors, each running a coordinator")
    r.add_argument("--ray-batch-size", type=int, default=256, help="prompts per batch an actor takes")
    _setting_flags(p)


def _teacher_flags(p: argparse.ArgumentParser) -> Any:
    """The flags of named teachers, the same for generate and the gateway."""
    t = p.add_argument_group("several teachers")
    t.add_argument("--teacher", action="append", type=teacher_text, metavar="NAME=URL[,URL...][;OPTION=VALUE...]",
                   help="a named teacher (repeat it for more): its URL or replicas, then options among dialect, "
                   "model, temperature, chat (yes/no) and prompt_field; instead of --t-url")  # fmt: skip
    t.add_argument("--default-teacher", metavar="NAME", help="where a line that names none goes (default: the first)")
    t.add_argument("--mix", type=mix_text, metavar="NAME=W,NAME=W",
                   help="sample every line from the mixture of these teachers, weights summing to 1 "
                   "(a line's 'teachers' field gives its own)")  # fmt: skip
    return t


def _gateway_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("gateway", help="an HTTP endpoint that answers as vLLM or SGLang, every token drawn from q*")
    g = p.add_argument_group("gateway")
    g.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    g.add_argument("--port", type=int, default=8000, help="the port to listen on (0: a free one)")
    g.add_argument("--passthrough", action="append", default=[], metavar="PATH",
                   help="another path forwarded to every base replica, any method (repeat it for more), "
                   "e.g. /areal_update_weights")  # fmt: skip
    g.add_argument("--max-queued", type=int, default=None, metavar="N",
                   help="requests that may wait for a slot; past it, 503 with Retry-After (default 1024)")  # fmt: skip
    g.add_argument("--max-concurrent-requests", type=int, default=256, metavar="N",
                   help="requests sampled at once (their sequences share the rounds); more wait")  # fmt: skip
    g.add_argument("--teacher-system", metavar="TEXT", help="a system message only the teacher sees (chat requests)")
    g.add_argument("--max-logprobs", type=int, default=20, metavar="N", help="the cap on a request's logprobs")
    g.add_argument("--stream-interval", type=int, default=1, metavar="N",
                   help="tokens per streamed event, as the engines' flag: a choice's first token at once, then "
                   "every N (a request's stream_interval may raise it)")  # fmt: skip
    _teacher_flags(p)
    _setting_flags(p, generate=False)


def _demo_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    by_name = {s.name: s for s in SETTINGS}
    p = sub.add_parser("demo", help="start two reference servers and generate from q* for a few questions")
    p.add_argument("--max-tokens", type=int, default=80)
    p.add_argument("--seed", type=int, default=by_name["seed"].default)
    p.add_argument("--samples", type=int, default=3, help="how many samples to print")
    p.add_argument("--dialect", choices=[d for d in DIALECT_NAMES if d != "auto"], default="vllm-completions",
                   help="which engine the reference servers imitate, and how to talk to them")  # fmt: skip
    p.add_argument("--scoring", choices=list(get_args(Scoring)), default=by_name["scoring"].default)
    p.add_argument("--speculate", type=speculate_text, default=by_name["speculate"].default, metavar="K",
                   help="drafted tokens per speculative round (vllm-generate or sglang)")  # fmt: skip


def _bench_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("bench", help="time the Rust step against the numpy reference on this machine")
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--k", type=int, default=100, help="entries per model's top-k list")
    p.add_argument("--repeat", type=int, default=20)


# What `dualsample --help` opens with.
DESCRIPTION = (
    "Generate training data by sampling token by token from q* ∝ π_θ^(1−α)·π_t^α, the geometric "
    "mixture of a base model and a teacher model served by vLLM or SGLang, with α chosen at each "
    "position. Records carry every token's id, α and log probability under π_θ, π_t and q*."
)


def main(argv: list[str] | None = None) -> int:
    parser = _Parser(prog="dualsample", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"dualsample {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _generate_parser(sub)
    _gateway_parser(sub)
    serve_cli.add_parser(sub)
    _demo_parser(sub)
    _bench_parser(sub)
    export.add_parser(sub)
    report.add_parser(sub)
    args = parser.parse_args(argv)
    try:
        if getattr(args, "run", None) is not None:  # a subcommand that runs itself (export, report)
            return int(args.run(args))
        if args.command == "serve":
            return serve_cli.main(args)
        if args.command == "generate":
            config = config_from_args(args)
            if args.ray is not None:
                return jobs.run_ray(args, config)
            return asyncio.run(jobs.stoppable(args.command, jobs.run_generate(args, config)))
        if args.command == "gateway":
            config = config_from_args(args)
            return asyncio.run(jobs.stoppable(args.command, jobs.run_gateway(args, config)))
        runner = jobs.run_demo if args.command == "demo" else jobs.run_bench
        return asyncio.run(jobs.stoppable(args.command, runner(args)))
    except DualSampleError as err:
        print(f"dualsample {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
