"""`Coordinator` (earlier `DualVLLMCoordinator`): the public face of a run. It wires
the parts together:

- :mod:`.startup` and :mod:`.handshake` probe the base and every teacher at start-up;
- :mod:`..backends` speak each server's wire dialect;
- :mod:`.scheduler` keeps sequences in flight and batches them;
- :mod:`.strategies` asks the servers for a round's rows, the way the run chose at start;
- :mod:`.round` advances a batch by a round (one Rust `step`, then the tokens applied);
- :mod:`.teachers` says which teacher (or mixture) each record goes to;
- :mod:`.stats` counts.

The draw for a token is keyed by (seed, the sequence's key, position), so records do not
depend on concurrency, batching or dialect.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from collections.abc import Sequence as Seq
from typing import Any

from ..backends import Backend, Context, RequestStats
from ..backends.replicas import ReplicaSet
from ..config.coordinator import CoordinatorConfig, tempered_mixture
from ..exceptions import (
    APIError,
    ConfigurationError,
    DualSampleError,
    InvalidInputError,
)
from ..io.prompts import Prompt, check_prompt
from ..io.record import GenerationOutput, summarise
from .handshake import ServerInfo, agree, stop_and_excluded_ids
from .pace import Pace, block_for
from .round import Round, RoundKey, Routed
from .scheduler import Scheduler
from .sequence import Sequence, WorkItem, stable_key
from .serving import Serving
from .startup import open_connections, start_model
from .stats import Statistics
from .strategies import Joined, Mixed, choose, scored_ids, speculation_problem
from .teachers import Lane, Mixture, Routes

log = logging.getLogger("dualsample_rs")

# Retries of each start-up request, at least (see `start`).
STARTUP_RETRIES = 8
# Workers (concurrent batches) at least, with speculative rounds.
SPECULATION_WORKERS = 8
# A served item's token budget when neither it nor the call sets one: its context ends it.
UNBOUNDED_TOKENS = 2**31 - 1

__all__ = [
    "Coordinator",
    "DualVLLMCoordinator",
    "EnhancedDualVLLMCoordinator",
    "Serving",
    "WorkItem",
    "generate_with_dual_prompts",
    "stable_key",
]


class Coordinator:
    """Generate from q* ∝ π_θ^(1−α)·π_t^α with a base and a teacher server.

    Use it as an async context manager: entering checks both servers (dialect, shared
    vocabulary, top_k within their cap) and finds the stop ids.

    Args:
        config: the run's settings.

    Attributes:
        base, teacher: the two models' replicas, in their dialect (from `start` on; ``theta`` is
            ``base`` under its earlier name).
        info: what the handshake found, per server.

    Example:
        >>> async with Coordinator(CoordinatorConfig()) as coord:  # doctest: +SKIP
        ...     outs = await coord.generate_batch(["Why is the sky blue?"], max_tokens=64)
    """

    def __init__(self, config: CoordinatorConfig | None = None) -> None:
        self.config = config or CoordinatorConfig()
        if self.config.run.enable_logging:
            logging.basicConfig()
            log.setLevel(self.config.run.log_level.upper())
        # One connection per replica, opened now (a bad URL fails here); the backends of
        # their dialects are built on them at start-up, which closes nothing: aclose does.
        teachers = self.config.teacher_settings()
        self._teacher_settings = teachers
        self._base_server = self.config.servers[0]
        self._connections = (
            open_connections(self._base_server, self.config.transport),
            *(open_connections(t.server(), self.config.transport) for t in teachers.values()),
        )
        self._base: ReplicaSet | None = None
        #: the teachers' lanes and where each record goes (from `start` on)
        self.routes: Routes | None = None
        self.default_teacher = self.config.default_teacher or next(iter(teachers))
        self.stats = Statistics()
        #: what the handshake found: (base, default teacher)
        self.info: tuple[ServerInfo, ServerInfo] | None = None
        self.stop_ids: tuple[int, ...] = ()
        self.exclude_ids: tuple[int, ...] = ()
        #: drafted tokens per speculative round in effect (0 when the servers cannot)
        self.speculate: int | str = self.config.run.speculate
        #: why speculative rounds asked for are off, by teacher ("": the unnamed one)
        self.speculation_off: dict[str, str] = {}
        #: under speculate="auto", each lane's (name, temperature) choice of round kind
        self._paces: dict[RoundKey, Pace] = {}

    async def __aenter__(self) -> Coordinator:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._base is not None:
            await asyncio.gather(self._base.aclose(), *(lane.replicas.aclose() for lane in self.lanes.values()))
        await asyncio.gather(*(conn.close() for conns in self._connections for conn in conns))

    @property
    def lanes(self) -> dict[str, Lane]:
        """Each teacher's lane by name (the unnamed one under ""): its replicas and what
        start-up found (empty before `start`)."""
        return {} if self.routes is None else self.routes.lanes

    @property
    def base(self) -> ReplicaSet:
        """The base model's replicas, in their dialect (after `start`)."""
        return self._started()[0]

    @property
    def theta(self) -> ReplicaSet:
        """The base model's replicas (the name earlier versions used)."""
        return self.base

    @property
    def teacher(self) -> ReplicaSet:
        """The (default) teacher's replicas, in their dialect (after `start`)."""
        return self._started()[1]

    def _routes(self) -> Routes:
        if self.routes is None:
            raise DualSampleError("the coordinator has not started: use it with `async with`, or await start()")
        return self.routes

    def _started(self) -> tuple[ReplicaSet, ReplicaSet]:
        if self._base is None:
            raise DualSampleError("the coordinator has not started: use it with `async with`, or await start()")
        return self._base, self.lanes[self.default_teacher].replicas

    async def start(self) -> None:
        """Probe the base and every teacher, check that each teacher agrees with the base,
        and settle each teacher's stop and excluded ids and speculation."""
        if self.info is not None:
            return
        cfg = self.config
        # A server that is still loading answers 503 for a while, and start-up is a few
        # cheap requests: give it at least STARTUP_RETRIES retries whatever the run's own.
        retries = max(cfg.transport.max_retries, STARTUP_RETRIES)
        scored = scored_ids(cfg)
        servers = (self._base_server, *(t.server() for t in self._teacher_settings.values()))
        got = await asyncio.gather(
            *(
                start_model(conns, server, cfg.sampler.top_k, retries, scored[min(i, 1)])
                for i, (conns, server) in enumerate(zip(self._connections, servers, strict=True))
            ),
            return_exceptions=True,
        )
        started = [g for g in got if not isinstance(g, BaseException)]
        if len(started) < len(got):  # close what did start before saying what did not
            await asyncio.gather(*(replicas.aclose() for replicas, _ in started))
            raise next(g for g in got if isinstance(g, BaseException))
        theta, info_a = started[0]
        self._base = theta
        lanes = {
            name: Lane(name, self._teacher_settings[name], replicas, info_b)
            for name, (replicas, info_b) in zip(self._teacher_settings, started[1:], strict=True)
        }
        self.routes = Routes(cfg, lanes, self.default_teacher)  # every replica set is closed by aclose now
        for name, lane in lanes.items():
            replicas, info_b = lane.replicas, lane.info
            try:
                agree(info_a, info_b)
            except ConfigurationError as err:
                raise ConfigurationError(f"teacher {name!r}: {err}" if name else str(err)) from None
            lane.stop_ids, lane.exclude_ids = stop_and_excluded_ids(
                info_a, info_b, cfg.run.stop_token_ids, cfg.sampler.exclude_special_tokens,
                cfg.sampler.special_token_ids,
            )  # fmt: skip
            if not lane.stop_ids:
                log.warning(
                    "no end-of-sequence id found on the servers%s: sequences run to max_tokens (pass stop_token_ids)",
                    f" of teacher {name!r}" if name else "",
                )
            lane.speculate = cfg.run.speculate
            if cfg.run.speculate:
                problem = await speculation_problem(lane.config(cfg, 1.0), theta, replicas)
                if problem is not None:
                    log.warning("speculative rounds are off, one token per step%s: %s",
                                f" (teacher {name!r})" if name else "", problem)  # fmt: skip
                    self.speculation_off[name] = problem
                    lane.speculate = 0
        default = self.lanes[self.default_teacher]
        self.stop_ids, self.exclude_ids, self.speculate = default.stop_ids, default.exclude_ids, default.speculate
        self.info = (info_a, default.info)
        log.info(
            "servers ready (%s, %s): stop ids %s, excluded ids %s",
            info_a.dialect,
            ", ".join(f"{lane.name or 'teacher'}: {lane.info.dialect}" for lane in self.lanes.values()),
            self.stop_ids,
            self.exclude_ids,
        )

    @property
    def model_names(self) -> tuple[str | None, str | None]:
        """The models the two servers serve (None for each before `start`)."""
        if self._base is None:
            return None, None
        return self.base.model, self.teacher.model

    # ------------------------------------------------------------ public API
    async def generate_batch(
        self,
        prompts: Seq[Prompt],
        max_tokens: int = 100,
        temperature: float = 1.0,
        return_diagnostics: bool = False,
        show_progress: bool = True,
    ) -> list[GenerationOutput]:
        """Generate from the same prompt for both models, one output per prompt, in order."""
        return await self.generate_batch_dual_prompts(
            prompts, prompts, max_tokens, temperature, return_diagnostics, show_progress
        )

    async def generate_batch_dual_prompts(
        self,
        prompts_theta: Seq[Prompt],
        prompts_t: Seq[Prompt],
        max_tokens: int = 100,
        temperature: float = 1.0,
        return_diagnostics: bool = False,
        show_progress: bool = True,
        teacher_chat: bool = False,
        teachers: Seq[str | dict[str, float] | None] | None = None,
    ) -> list[GenerationOutput]:
        """Generate with a different prompt per model (e.g. plain for the base, a chat
        template for the teacher: ``teacher_chat=True`` wraps each teacher prompt as a
        user message through the teacher server's template). Outputs come in order.

        With named teachers, ``teachers[i]`` says where prompt i goes: a teacher's name, a
        mixture ``{name: weight}``, or None (the run's mixture, else the default teacher)."""
        if len(prompts_theta) != len(prompts_t):
            raise InvalidInputError(f"prompts_t: {len(prompts_t)} prompts, but prompts_theta has {len(prompts_theta)}")
        if teachers is not None and len(teachers) != len(prompts_theta):
            raise InvalidInputError(f"teachers: {len(teachers)} entries, but prompts_theta has {len(prompts_theta)}")
        routes = [None] * len(prompts_theta) if teachers is None else list(teachers)
        items = [
            WorkItem(i, a, b, i, teacher_chat, teacher=r if not isinstance(r, dict) else None,
                     mix=r if isinstance(r, dict) else None)
            for i, (a, b, r) in enumerate(zip(prompts_theta, prompts_t, routes, strict=True))
        ]  # fmt: skip
        outs: list[GenerationOutput | None] = [None] * len(items)
        async for index, out in self.iter_generate(items, max_tokens, temperature, return_diagnostics, show_progress):
            outs[index] = out
        return [o for o in outs if o is not None]

    async def iter_generate(
        self,
        items: Iterable[WorkItem],
        max_tokens: int = 100,
        temperature: float = 1.0,
        return_diagnostics: bool = False,
        show_progress: bool = True,
        total: int | None = None,
    ) -> AsyncIterator[tuple[int, GenerationOutput]]:
        """Yield ``(position in items, output)`` as sequences finish, in finishing order."""
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
            raise InvalidInputError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
        if not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
            raise InvalidInputError(f"temperature: must be a positive number, got {temperature!r}")
        await self.start()
        if self.stats.tokens == 0:
            self.stats.started = time.monotonic()
        if total is None:
            items = list(items)
            total = len(items)
        progress = _progress(total, show_progress)

        def on_output(out: GenerationOutput) -> None:
            self.stats.count_finished(out)
            progress.update(1)
            # A hidden bar counts nothing (its n stays 0), and the figures cost a summary
            # of every counter: only for a bar that is shown.
            if not progress.disable and (progress.n % 8 == 0 or progress.n == total):
                progress.set_postfix(self._postfix(), refresh=False)

        scheduler = self._scheduler(max_tokens, temperature, return_diagnostics, on_output)
        try:
            async for got in scheduler.run(items):
                yield got
        finally:
            progress.close()

    def serving(
        self, max_tokens: int | None = None, temperature: float = 1.0, return_diagnostics: bool = False
    ) -> Serving:
        """A long-lived run that takes items while others are in flight (continuous
        batching): ``async with coord.serving() as serve: out = await serve.generate(item)``.
        Every item in flight shares the batched rounds, a new one joins at its batch's next
        step, and each item's own `max_tokens`, `temperature`, stop ids and `on_token`
        callback apply (None: these defaults; `max_tokens` None: up to the context).
        Cancelling a ``generate`` call drops its sequence before its next round."""
        if not 0 < temperature < math.inf:
            raise InvalidInputError(f"temperature: must be a positive number, got {temperature!r}")

        def make(on_output: Any, gate: Callable[[], Awaitable[Any]]) -> Scheduler:
            return self._scheduler(max_tokens or UNBOUNDED_TOKENS, temperature, return_diagnostics, on_output, gate)

        return Serving(self, make)

    def _scheduler(
        self,
        max_tokens: int,
        temperature: float,
        diagnostics: bool,
        on_output: Any,
        gate: Callable[[], Awaitable[Any]] | None = None,
    ) -> Scheduler:
        """The scheduler of a call: its rounds (one per teacher or mixture and temperature,
        made as sequences need them), workers and batch size; `gate` is awaited before
        each step."""
        cfg = self.config

        def round_for(key: RoundKey) -> Round:
            name, t = key
            call_cfg = cfg
            if t != 1.0:
                # The call's temperature scales both models, on top of the config's own.
                call_cfg = cfg.replace(
                    temperature=cfg.sampler.temperature * t,
                    temperature_t=cfg.sampler.teacher_temperature * t,
                )
            return self._round(name, call_cfg, t, diagnostics)

        rounds = {(name, float(temperature)): round_for((name, float(temperature))) for name in self.lanes}
        advance = Routed(rounds, round_for, self.base, cfg.sampler.top_k, self.stats)
        workers = self._workers(
            cfg, any(r.ask.serial for r in rounds.values()), any(lane.speculate for lane in self.lanes.values())
        )
        batch = max(1, min(cfg.run.max_batch_size, math.ceil(cfg.run.max_concurrency / workers)))
        return Scheduler(
            lambda index, item: self._prepare(index, item, max_tokens, temperature),
            advance,
            self._finish,
            workers,
            batch,
            on_output,
            gate,
        )

    @staticmethod
    def _workers(cfg: CoordinatorConfig, serial: bool, speculate: bool = True) -> int:
        """Concurrent batches of a call, for a strategy that asks in series or not,
        with or without speculation."""
        # A strategy that asks the teacher, then the base, needs two workers or more to
        # keep both servers busy, each with its own half of the sequences in flight.
        least = 2 if serial else 1
        if speculate:
            # Rounds vary in length and each waits for its slowest sequence: more, smaller
            # batches keep both servers busier (bench_speculation: +1-11% tokens/s over two).
            least = min(cfg.run.max_concurrency, SPECULATION_WORKERS)
        return max(math.ceil(cfg.run.max_concurrency / cfg.run.max_batch_size), least)

    def _round(self, key: str, cfg: CoordinatorConfig, temperature: float, diagnostics: bool) -> Round:
        """The round of one teacher's sequences, or of one mixture's (`key`), under the
        call's settings `cfg` and `temperature`."""
        route = self._routes()[key]
        if isinstance(route, Lane):
            lane_cfg = route.config(cfg, temperature)
            ask = choose(lane_cfg, self.base, route.replicas, route.speculate)
            speculate = route.speculate
            # "auto" also runs rounds of one token per sequence, asked as without
            # speculation, its workers' rounds joined into requests as one worker's would be.
            one = None
            if speculate == "auto":
                one = Joined(choose(lane_cfg, self.base, route.replicas, 0), cfg.run.max_batch_size)
            # One pace per lane and temperature for the coordinator's life: what it
            # measured carries over from one call to the next.
            pace = None
            if one is not None:
                workers = self._workers(cfg, serial=True, speculate=True)
                joined = max(1, workers // (2 if one.serial else 1))  # rounds per joined request
                pace = self._paces.setdefault((key, temperature), Pace(block=block_for(workers), joined=joined))
        else:
            # Teachers with their own temperatures: reweighted, one temperature for the mix.
            taus = [lane.config(cfg, temperature).sampler.teacher_temperature for lane in route.lanes]
            weights, tau = tempered_mixture(list(route.weights), taus)
            lane_cfg = cfg.replace(temperature_t=tau)
            members = {lane.name: (lane.replicas, w) for lane, w in zip(route.lanes, weights, strict=True)}
            ask, speculate = Mixed(self.base, members, cfg.sampler.top_k, cfg.sampler.missing), 0
            one = pace = None
        assert self.info is not None
        want_diag = diagnostics or (cfg.sampler.enable_stability_check and not cfg.sampler.auto_fallback)
        return Round(
            ask,
            lane_cfg,
            lane_cfg.sampler_config(route.exclude_ids, diagnostics=want_diag),
            speculate,
            route.stop_ids,
            (self.info[0].max_model_len, min(lane.info.max_model_len for lane in route.lanes)),
            self.stats,
            diagnostics,
            one,
            pace,
        )

    def get_statistics(self) -> dict[str, Any]:
        """Counts so far (see `Statistics.summary` for the keys), and per replica of each
        model its share of the work under ``"replicas"`` (empty before start)."""
        if self._base is None:
            summary = self.stats.summary(RequestStats(), [])
            summary["replicas"] = {}
            return summary
        teachers = {name: lane.replicas.stats for name, lane in self.lanes.items()}
        summary = self.stats.summary(self.base.stats, list(teachers.values()))
        if self.config.teachers:
            summary["teachers"] = self.stats.by_teacher(teachers)
        models = [("theta", self.base, summary["sequences"]), ("t", self.teacher, summary["sequences"])]
        if self.config.teachers:  # each named teacher's too, under "t:NAME"
            models[1] = ("t", self.teacher, summary["teachers"][self.default_teacher]["sequences"])
            models += [(f"t:{name}", lane.replicas, summary["teachers"][name]["sequences"])
                       for name, lane in self.lanes.items()]  # fmt: skip
        summary["replicas"] = {
            name: [
                {
                    **dataclasses.asdict(info),
                    # one replica takes every sequence without being placed
                    **({"sequences": sequences} if len(rs.replicas) == 1 else {}),
                    "requests": r.stats.requests,
                    "in_flight": load,
                    "cache_hit_rate": r.stats.cache_hit_rate,
                }
                for info, r, load in zip(rs.replica_stats, rs.replicas, rs.load, strict=True)
            ]
            for name, rs, sequences in models
        }
        return summary

    # ------------------------------------------------------------ one sequence
    async def prompt_ids(
        self, backend: Backend, prompt: Any, name: str, info: ServerInfo, chat: bool = False
    ) -> list[int]:
        """The prompt's ids on one server (text tokenized, in its chat template with
        `chat`), checked against what that server's model takes: an id it does not know,
        no id at all, or no room left to generate raise `InvalidInputError` naming `name`
        (the line and field), never fail the server."""
        prompt = check_prompt(prompt, name)
        if not isinstance(prompt, str):
            return self._checked(prompt, name, info)
        return await self._text_ids(backend, prompt, name, info, chat)

    async def _text_ids(self, backend: Backend, text: str, name: str, info: ServerInfo, chat: bool) -> list[int]:
        """`prompt_ids` of a text already checked."""
        if chat:
            ids = await backend.tokenize(messages=[{"role": "user", "content": text}])
        else:
            ids = await backend.tokenize(text)
        return self._checked(ids, name, info)

    @staticmethod
    def _checked(ids: list[int], name: str, info: ServerInfo) -> list[int]:
        if not ids:
            raise InvalidInputError(f"{name}: the prompt is no tokens on {info.url}")
        if info.vocab_size is not None and max(ids) >= info.vocab_size:
            bad = next(t for t in ids if t >= info.vocab_size)
            raise InvalidInputError(
                f"{name}: token id {bad} is outside the vocabulary of {info.url}'s model ({info.vocab_size} ids)"
            )
        if len(ids) >= info.max_model_len:
            raise InvalidInputError(
                f"{name}: the prompt is {len(ids)} tokens and {info.url}'s model takes {info.max_model_len} in all "
                "(prompt and generated tokens): no room to generate"
            )
        return ids

    async def _prompts(self, asks: list[tuple[Backend, Any, str, ServerInfo, bool]]) -> list[list[int]]:
        """`prompt_ids` of each ask: token ids checked in place and texts tokenized
        together. Ids take no task, so a served item is ready within the round it
        arrives in rather than after a few more turns of a busy event loop."""
        got: list[Any] = [None] * len(asks)
        texts: list[tuple[int, Awaitable[list[int]]]] = []
        for i, (backend, prompt, name, info, chat) in enumerate(asks):
            prompt = check_prompt(prompt, name)
            if isinstance(prompt, str):
                texts.append((i, self._text_ids(backend, prompt, name, info, chat)))
            else:
                got[i] = self._checked(prompt, name, info)
        for (i, _), ids in zip(texts, await _together([job for _, job in texts]), strict=True):
            got[i] = ids
        return got

    async def _prepare(self, index: int, item: WorkItem, max_tokens: int, temperature: float = 1.0) -> Sequence:
        where = f"{item.where}, " if item.where else ""
        route = self._routes().route(item, where)
        lanes = route.lanes
        assert self.info is not None
        ids_base, *ids_teachers = await self._prompts(
            [
                (self.base, item.prompt, where + "prompt", self.info[0], False),
                *(
                    (
                        lane.replicas,
                        item.teacher_prompt(lane.name),
                        where + "teacher_prompt",
                        lane.info,
                        item.teacher_chat if lane.settings.chat is None else lane.settings.chat,
                    )
                    for lane in lanes
                ),
            ]
        )
        if isinstance(route, Mixture):
            out = GenerationOutput(item.prompt, item.prompt_t, item.id, teachers=route.weights_by_name(),
                                   logp_teachers={lane.name: [] for lane in lanes},
                                   observed_teachers={lane.name: [] for lane in lanes})  # fmt: skip
        else:
            out = GenerationOutput(item.prompt, item.teacher_prompt(route.name), item.id, teacher=route.name or None,
                                   teacher_prompt_token_ids=list(ids_teachers[0]))  # fmt: skip
        out.prompt_token_ids = list(ids_base)
        ctx = [Context(ids) for ids in ids_teachers]
        t = float(temperature if item.temperature is None else item.temperature)
        limit = max_tokens if item.max_tokens is None else item.max_tokens
        return Sequence(item, index, Context(ids_base), ctx[0], limit, out, route.key, ctx[1:], temperature=t)

    async def _finish(self, seq: Sequence) -> None:
        """Summaries, the text, and (with `rescore`) each token's exact log probabilities."""
        out = seq.out
        if seq.diag:
            out.diagnostics = {name: summarise(values) for name, values in seq.diag.items()}
        # The base, then its teacher or its mixture's teachers, each with its context.
        models = [self.base, *(lane.replicas for lane in self._routes()[seq.teacher].lanes)]
        contexts = [seq.ctx_base, seq.ctx_teacher, *seq.more_teachers]
        for model, ctx in zip(models, contexts, strict=True):
            model.release([ctx])
        if out.finish_reason in ("error", "abort"):
            return
        text_ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        decode = seq.item.text or self.base.detokenize
        jobs: list[Any] = [decode(text_ids) if text_ids else _constant("")]
        if self.config.run.rescore:  # each context is its prompt, then the generated tokens
            n = len(out.token_ids)
            pairs = zip(models, contexts, strict=True)
            jobs += [model.sequence_logprobs(ctx.ids(), len(ctx) - n) for model, ctx in pairs]
        try:
            got = await _together(jobs)
        except APIError as err:
            seq.fail(err)
            return
        out.generated_text = got[0]
        if self.config.run.rescore:
            out.logp_theta_exact, out.logp_t_exact = got[1], got[2]
            if out.teachers is not None:  # a mixture: each teacher's, and Σ w·log π
                out.logp_teachers_exact = dict(zip(out.teachers, got[2:], strict=True))
                out.logp_t_exact = [
                    math.fsum(w * exact[i] for w, exact in zip(out.teachers.values(), got[2:], strict=True))
                    for i in range(len(got[1]))
                ]

    def _postfix(self) -> dict[str, str]:
        st = self.get_statistics()
        shown = {"tok/s": f"{st['tokens_per_second']:.0f}", "mean α": f"{st['mean_alpha']:.3f}"}
        if st["rounds"]:
            shown["tok/round"] = f"{st['tokens_per_round']:.2f}"
        for name, counts in st.get("teachers", {}).items():  # sequences done per teacher
            shown[name] = str(counts["sequences"])
        return shown


async def _together(jobs: list[Awaitable[Any]]) -> list[Any]:
    """The jobs' results, awaited together; one job (the usual case) is awaited in place,
    since a task would cost its caller more turns of a busy event loop."""
    if len(jobs) == 1:
        return [await jobs[0]]
    return list(await asyncio.gather(*jobs)) if jobs else []


async def _constant(value: Any) -> Any:
    return value


def _progress(total: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    # disable=None: show on a terminal only.
    return tqdm(total=total, unit="seq", disable=None if show else True, dynamic_ncols=True, smoothing=0.1)


async def generate_with_dual_prompts(
    prompts_theta: Seq[Prompt],
    prompts_t: Seq[Prompt],
    config: CoordinatorConfig | None = None,
    **kwargs: Any,
) -> list[GenerationOutput]:
    """One call: start a coordinator, generate, close it. ``kwargs`` go to
    :meth:`Coordinator.generate_batch_dual_prompts`."""
    async with Coordinator(config) as coord:
        return await coord.generate_batch_dual_prompts(prompts_theta, prompts_t, **kwargs)


# Earlier names of the class, kept for the code written against them.
DualVLLMCoordinator = Coordinator
EnhancedDualVLLMCoordinator = Coordinator
