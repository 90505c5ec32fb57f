"""The dual-context loop: sequences in flight, one batched request per server per step,
one Rust `step` per batch, stop conditions, statistics and progress.

Design notes. Each sequence keeps its two contexts as JSON text (``"[1,2,3"``) that grows
by one id per step, so building a request is a join, not a re-encoding of every context.
A worker owns up to ``max_batch_size`` sequences and refills from a queue of prompts
tokenised ahead by a feeder task, so sequences join and leave independently; with
``max_concurrency`` above the batch size several workers overlap one another's network
waits. The draw for a token is keyed by (seed, the sequence's key, position), so records
do not depend on concurrency or batching.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from . import _core
from ._constants import KNOWN_EOS_STRINGS, KNOWN_SPECIAL_STRINGS, VOCAB_PROBE_TEXT
from .client import TopK, VLLMClient
from .config import CoordinatorConfig
from .exceptions import APIError, BadRequestError, ConfigurationError, DualSampleError, InvalidInputError
from .output import DIAGNOSTIC_NAMES, GenerationOutput, summarise
from .prompts import Prompt, check_prompt

log = logging.getLogger("dualsample_rs")

# Retries of each start-up request, at least (see `start`).
STARTUP_RETRIES = 8
# Prompts being tokenised ahead of the workers at any moment.
READ_AHEAD = 64


def stable_key(value: Any) -> int:
    """A 63-bit key for a record id, the same in every run."""
    digest = hashlib.blake2b(repr(value).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class WorkItem:
    """One prompt pair to generate from. ``key`` keys the random draws."""

    key: int
    prompt: Prompt
    prompt_t: Prompt
    id: Any = None
    teacher_chat: bool = False
    where: str = ""  # how errors about this item name it, e.g. "line 12"


@dataclass
class _Seq:
    item: WorkItem
    index: int  # position in the caller's items
    ctx_theta: str
    ctx_t: str
    len_theta: int
    len_t: int
    max_tokens: int
    out: GenerationOutput
    diag: dict[str, list[float]] = field(default_factory=dict)
    done: bool = False


@dataclass
class Statistics:
    sequences: int = 0
    errors: int = 0
    tokens: int = 0
    steps: int = 0
    first_tokens_forced: int = 0
    constraint_applied: int = 0
    stability_fallbacks: int = 0
    stability_flagged: int = 0
    alpha_sum: float = 0.0
    started: float = field(default_factory=time.monotonic)


class DualVLLMCoordinator:
    """Generate from q* ∝ π_θ^(1−α)·π_t^α with two vLLM servers.

    Use it as an async context manager: entering checks both servers (same vocabulary,
    top_k within their cap) and finds the stop ids.

    Args:
        config: the run's settings.
        http_clients: optional ``(theta, teacher)`` ``httpx.AsyncClient`` pair to send
            requests through (e.g. with a custom transport); not closed on exit.

    Example:
        >>> async with DualVLLMCoordinator(CoordinatorConfig()) as coord:  # doctest: +SKIP
        ...     outs = await coord.generate_batch(["Why is the sky blue?"], max_tokens=64)
    """

    def __init__(
        self,
        config: CoordinatorConfig | None = None,
        *,
        http_clients: tuple[httpx.AsyncClient, httpx.AsyncClient] | None = None,
    ) -> None:
        self.config = config or CoordinatorConfig()
        if self.config.enable_logging:
            logging.basicConfig()
            log.setLevel(self.config.log_level.upper())
        keys = self.config.api_keys
        timeout = httpx.Timeout(self.config.request_timeout, connect=min(5.0, self.config.request_timeout))
        clients = http_clients or (None, None)
        self.theta, self.teacher = (
            VLLMClient(
                url,
                api_key=key,
                timeout=timeout,
                max_retries=self.config.max_retries,
                retry_delay=self.config.retry_delay,
                connection_pool_size=self.config.connection_pool_size,
                http_client=http,
            )
            for url, key, http in zip((self.config.theta_url, self.config.t_url), keys, clients, strict=True)
        )
        self.stats = Statistics()
        self.stop_ids: tuple[int, ...] = ()
        self.exclude_ids: tuple[int, ...] = ()
        self.model_names: tuple[str | None, str | None] = (self.config.theta_model_name, self.config.t_model_name)
        self.max_model_len: tuple[int, int] = (1 << 62, 1 << 62)
        self._started = False

    async def __aenter__(self) -> DualVLLMCoordinator:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await asyncio.gather(self.theta.aclose(), self.teacher.aclose())

    # ------------------------------------------------------------ start-up checks
    async def start(self) -> None:
        """Ask both servers for their model, check they share a vocabulary, check that
        top_k is within their logprobs cap, and settle the stop and excluded ids."""
        if self._started:
            return
        # A server that is still loading answers 503 for a while, and start-up is a few
        # cheap requests: give it at least STARTUP_RETRIES retries whatever the run's own.
        retries = max(self.config.max_retries, STARTUP_RETRIES)
        theta, teacher = self.theta.with_options(max_retries=retries), self.teacher.with_options(max_retries=retries)
        (name_a, len_a), (name_b, len_b) = await asyncio.gather(
            self._model_card(theta, self.config.theta_model_name),
            self._model_card(teacher, self.config.t_model_name),
        )
        self.model_names, self.max_model_len = (name_a, name_b), (len_a, len_b)
        probe_a, probe_b = await asyncio.gather(
            theta.tokenize(VOCAB_PROBE_TEXT, add_special_tokens=False),
            teacher.tokenize(VOCAB_PROBE_TEXT, add_special_tokens=False),
        )
        if probe_a != probe_b:
            raise ConfigurationError(
                "the two servers do not share a vocabulary: the same probe text tokenises to different ids "
                f"({self.config.theta_url}: {probe_a[:8]}..., {self.config.t_url}: {probe_b[:8]}...)"
            )
        specials_a, specials_b = await asyncio.gather(self._single_ids(theta), self._single_ids(teacher))
        if specials_a != specials_b:
            raise ConfigurationError(
                f"the two servers' special tokens differ: {self.config.theta_url} {specials_a}, "
                f"{self.config.t_url} {specials_b}"
            )
        await asyncio.gather(self._check_top_k(theta, name_a, probe_a), self._check_top_k(teacher, name_b, probe_a))
        self.stop_ids = await self._stop_ids(theta, teacher, specials_a)
        if self.config.exclude_special_tokens:
            found = self.config.special_token_ids
            if found is None:
                found = tuple(i for s, i in specials_a.items() if s in KNOWN_SPECIAL_STRINGS)
            self.exclude_ids = tuple(sorted(set(found) - set(self.stop_ids)))
        self._started = True
        log.info("servers ready: stop ids %s, excluded ids %s", self.stop_ids, self.exclude_ids)

    async def _model_card(self, client: VLLMClient, name: str | None) -> tuple[str | None, int]:
        cards = await client.models()
        card = next((c for c in cards if name is None or c.get("id") == name), None)
        if card is None:
            raise ConfigurationError(
                f"model {name!r} is not served at {client.base_url} (it serves {[c.get('id') for c in cards]})"
            )
        return card.get("id"), int(card.get("max_model_len") or (1 << 62))

    async def _single_ids(self, client: VLLMClient) -> dict[str, int]:
        """Known special strings that the tokenizer maps to a single id."""
        names = sorted(set(KNOWN_EOS_STRINGS) | set(KNOWN_SPECIAL_STRINGS))
        ids = await asyncio.gather(*(client.tokenize(s, add_special_tokens=False) for s in names))
        return {s: t[0] for s, t in zip(names, ids, strict=True) if len(t) == 1}

    async def _check_top_k(self, client: VLLMClient, model: str | None, probe: list[int]) -> None:
        try:
            await client.step(["[" + ",".join(map(str, probe[:4] or [0]))], self.config.top_k, model)
        except BadRequestError as err:
            if "logprobs" in str(err):
                raise ConfigurationError(
                    f"top_k={self.config.top_k} is above the number of log probabilities {client.base_url} returns "
                    f"({err.message}). Start vLLM with --max-logprobs {self.config.top_k} (or more), or lower top_k."
                ) from err
            raise

    async def _stop_ids(self, theta: VLLMClient, teacher: VLLMClient, specials: dict[str, int]) -> tuple[int, ...]:
        if self.config.stop_token_ids is not None:
            return tuple(self.config.stop_token_ids)
        info_a, info_b = await asyncio.gather(theta.tokenizer_info(), teacher.tokenizer_info())
        eos_names = {str(i["eos_token"]) for i in (info_a, info_b) if i and isinstance(i.get("eos_token"), str)}
        if eos_names:
            # Known special strings were already tokenised; only ask for others.
            unknown = sorted(eos_names - set(specials))
            ids = await asyncio.gather(*(theta.tokenize(s, add_special_tokens=False) for s in unknown))
            found = tuple(sorted({specials[s] for s in eos_names & set(specials)} | {t[0] for t in ids if len(t) == 1}))
        else:
            found = tuple(sorted({i for s, i in specials.items() if s in KNOWN_EOS_STRINGS}))
        if not found:
            log.warning("no end-of-sequence id found on the servers: sequences run to max_tokens (pass stop_token_ids)")
        return found

    # ------------------------------------------------------------ public API
    async def generate_batch(
        self,
        prompts: Sequence[Prompt],
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
        prompts_theta: Sequence[Prompt],
        prompts_t: Sequence[Prompt],
        max_tokens: int = 100,
        temperature: float = 1.0,
        return_diagnostics: bool = False,
        show_progress: bool = True,
        teacher_chat: bool = False,
    ) -> list[GenerationOutput]:
        """Generate with a different prompt per model (e.g. plain for the base, a chat
        template for the teacher: ``teacher_chat=True`` wraps each teacher prompt as a
        user message through the teacher server's template). Outputs come in order."""
        if len(prompts_theta) != len(prompts_t):
            raise InvalidInputError(f"prompts_t: {len(prompts_t)} prompts, but prompts_theta has {len(prompts_theta)}")
        items = [
            WorkItem(i, a, b, i, teacher_chat) for i, (a, b) in enumerate(zip(prompts_theta, prompts_t, strict=True))
        ]
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
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInputError(f"max_tokens: must be a positive integer, got {max_tokens!r}")
        if not temperature > 0:
            raise InvalidInputError(f"temperature: must be positive, got {temperature!r}")
        await self.start()
        if self.stats.tokens == 0:
            self.stats.started = time.monotonic()
        cfg = self.config
        if temperature != 1.0:
            # The call's temperature scales both models, on top of the config's own.
            cfg = cfg.replace(
                temperature=cfg.temperature * temperature,
                temperature_t=(cfg.temperature_t if cfg.temperature_t is not None else cfg.temperature) * temperature,
            )
        want_diag = return_diagnostics or (cfg.enable_stability_check and not cfg.auto_fallback)
        sampler = cfg.sampler_config(self.exclude_ids, diagnostics=want_diag)
        items = list(items) if total is None else items
        n_total = total if total is not None else len(items)  # type: ignore[arg-type]
        progress = _progress(n_total, show_progress)
        ready: asyncio.Queue[_Seq | None] = asyncio.Queue(maxsize=2 * cfg.max_batch_size)
        # Outputs, None when a worker is done, or the exception that stopped a task.
        finished: asyncio.Queue[tuple[int, GenerationOutput] | BaseException | None] = asyncio.Queue()
        workers = max(1, math.ceil(cfg.max_concurrency / cfg.max_batch_size))
        batch = min(cfg.max_batch_size, cfg.max_concurrency)
        feeder = asyncio.create_task(self._feed(items, max_tokens, ready, finished, workers))
        tasks = [
            asyncio.create_task(self._worker(ready, finished, sampler, batch, return_diagnostics))
            for _ in range(workers)
        ]
        done_workers = 0
        try:
            while done_workers < workers:
                got = await finished.get()
                if got is None:
                    done_workers += 1
                    continue
                if isinstance(got, BaseException):
                    raise got
                self._count_finished(got[1])
                progress.update(1)
                if progress.n % 8 == 0 or progress.n == n_total:
                    progress.set_postfix(self._postfix(), refresh=False)
                yield got
            await feeder
        finally:
            for t in (feeder, *tasks):
                t.cancel()
            await asyncio.gather(feeder, *tasks, return_exceptions=True)
            progress.close()

    def get_statistics(self) -> dict[str, Any]:
        """Counts so far: requests, retries and failures per server and in total, tokens,
        sequences, errors, first tokens forced, constraint applied, stability fallbacks,
        tokens per second and mean α."""
        s = self.stats
        elapsed = max(time.monotonic() - s.started, 1e-9)
        a, t = self.theta.stats, self.teacher.stats
        return {
            "requests": a.requests + t.requests,
            "retries": a.retries + t.retries,
            "failures": a.failures + t.failures,
            "requests_theta": a.requests,
            "requests_t": t.requests,
            "retries_theta": a.retries,
            "retries_t": t.retries,
            "sequences": s.sequences,
            "errors": s.errors,
            "tokens": s.tokens,
            "steps": s.steps,
            "first_tokens_forced": s.first_tokens_forced,
            "constraint_applied": s.constraint_applied,
            "stability_fallbacks": s.stability_fallbacks,
            "stability_flagged": s.stability_flagged,
            "mean_alpha": s.alpha_sum / s.tokens if s.tokens else math.nan,
            "elapsed_s": elapsed,
            "tokens_per_second": s.tokens / elapsed,
        }

    # ------------------------------------------------------------ the loop
    async def _feed(
        self,
        items: Iterable[WorkItem],
        max_tokens: int,
        ready: asyncio.Queue[_Seq | None],
        finished: asyncio.Queue[tuple[int, GenerationOutput] | BaseException | None],
        workers: int,
    ) -> None:
        """Tokenise prompts ahead of the workers and queue them. At most `READ_AHEAD`
        prompts are being prepared at once, and the queue is bounded too, so memory does
        not grow with the number of items. If reading the items fails, the error goes to
        the consumer instead of leaving the workers waiting."""
        slots = asyncio.Semaphore(READ_AHEAD)
        pending: set[asyncio.Task[None]] = set()

        async def prepare(index: int, item: WorkItem) -> None:
            try:
                try:
                    seq = await self._prepare(index, item, max_tokens)
                except (APIError, DualSampleError) as err:
                    out = GenerationOutput(item.prompt, item.prompt_t, item.id, finish_reason="error", error=str(err))
                    await finished.put((index, out))
                    return
                await ready.put(seq)
            finally:
                slots.release()

        try:
            for index, item in enumerate(items):
                await slots.acquire()  # a slot is held until the prompt is queued
                task = asyncio.create_task(prepare(index, item))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        except Exception as err:  # handed to the consumer, which raises it
            await finished.put(err)
            return
        for _ in range(workers):
            await ready.put(None)

    async def _tokens(self, client: VLLMClient, prompt: Any, chat: bool, name: str) -> list[int]:
        prompt = check_prompt(prompt, name)
        if isinstance(prompt, str):
            if chat:
                return await client.tokenize(messages=[{"role": "user", "content": prompt}])
            return await client.tokenize(prompt)
        return prompt

    async def _prepare(self, index: int, item: WorkItem, max_tokens: int) -> _Seq:
        where = f"{item.where}, " if item.where else ""
        ids_a, ids_b = await asyncio.gather(
            self._tokens(self.theta, item.prompt, False, where + "prompt"),
            self._tokens(self.teacher, item.prompt_t, item.teacher_chat, where + "teacher_prompt"),
        )
        out = GenerationOutput(item.prompt, item.prompt_t, item.id)
        return _Seq(
            item,
            index,
            "[" + ",".join(map(str, ids_a)),
            "[" + ",".join(map(str, ids_b)),
            len(ids_a),
            len(ids_b),
            max_tokens,
            out,
        )

    async def _worker(
        self,
        ready: asyncio.Queue[_Seq | None],
        finished: asyncio.Queue[tuple[int, GenerationOutput] | BaseException | None],
        sampler: _core.SamplerConfig,
        batch: int,
        diagnostics: bool,
    ) -> None:
        active: list[_Seq] = []
        exhausted = False
        finishing: set[asyncio.Task[None]] = set()

        async def finish(seq: _Seq) -> None:
            await self._finish(seq)
            await finished.put((seq.index, seq.out))

        try:
            while True:
                while not exhausted and len(active) < batch:
                    if active and ready.empty():
                        break
                    seq = await ready.get()
                    if seq is None:
                        exhausted = True
                    else:
                        active.append(seq)
                if not active:
                    break
                await self._step(active, sampler, diagnostics)
                for seq in active:
                    if seq.done:
                        # Detokenising the text is a round trip: do it beside the next step.
                        task = asyncio.create_task(finish(seq))
                        finishing.add(task)
                        task.add_done_callback(finishing.discard)
                active = [seq for seq in active if not seq.done]
            if finishing:
                await asyncio.gather(*finishing)
        except Exception as err:  # a bug must surface, not hang the run
            await finished.put(err)
        finally:
            await finished.put(None)

    async def _step(self, active: list[_Seq], sampler: _core.SamplerConfig, diagnostics: bool) -> None:
        """One token for every sequence in `active`; failures become per-sequence errors."""
        k = self.config.top_k
        got = await asyncio.gather(
            self.theta.step([s.ctx_theta for s in active], k, self.model_names[0]),
            self.teacher.step([s.ctx_t for s in active], k, self.model_names[1]),
            return_exceptions=True,
        )
        failure = next((g for g in got if isinstance(g, BaseException)), None)
        if failure is not None:
            if not isinstance(failure, (APIError, DualSampleError)):
                raise failure
            if isinstance(failure, BadRequestError) and len(active) > 1:
                # A bad request fails the whole batch: split it to find the culprits.
                half = len(active) // 2
                await self._step(active[:half], sampler, diagnostics)
                await self._step(active[half:], sampler, diagnostics)
                return
            for seq in active:
                self._fail(seq, failure)
            return
        top_a, top_b = got
        assert isinstance(top_a, TopK) and isinstance(top_b, TopK)
        self._apply(active, top_a, top_b, sampler, diagnostics)

    def _apply(
        self, active: list[_Seq], top_a: TopK, top_b: TopK, sampler: _core.SamplerConfig, diagnostics: bool
    ) -> None:
        positions = np.fromiter((len(s.out.token_ids) for s in active), dtype=np.int64, count=len(active))
        keys = np.fromiter((s.item.key for s in active), dtype=np.int64, count=len(active))
        force = positions == 0 if self.config.force_first_token else np.zeros(len(active), dtype=bool)
        try:
            res = _core.step(
                top_a.ids, top_a.logp, top_b.ids, top_b.logp,
                config=sampler, seed=self.config.seed, positions=positions, row_keys=keys, force_teacher=force,
            )  # fmt: skip
        except InvalidInputError as err:
            if len(active) == 1:
                self._fail(active[0], err)
                return
            half = len(active) // 2  # isolate the row the servers sent bad data for
            sub = lambda a, b, t: TopK(t.ids[a:b], t.logp[a:b])  # noqa: E731
            self._apply(active[:half], sub(0, half, top_a), sub(0, half, top_b), sampler, diagnostics)
            self._apply(active[half:], sub(half, None, top_a), sub(half, None, top_b), sampler, diagnostics)
            return
        self.stats.steps += 1
        self.stats.first_tokens_forced += int(force.sum())
        if self.config.constraint_to_target:
            self.stats.constraint_applied += len(active)
        self.stats.stability_fallbacks += int(res.fallback.sum()) if sampler.stability_js_max is not None else 0
        if self.config.enable_stability_check and not self.config.auto_fallback and res.js is not None:
            self.stats.stability_flagged += int((res.js > self.config.stability_threshold_js).sum())
        names = ("token_id", "alpha", "logp_theta", "logp_t", "logq", "observed_theta", "observed_t", "fallback")
        cols = [getattr(res, n).tolist() for n in names]
        diag_cols = [getattr(res, n).tolist() for n in DIAGNOSTIC_NAMES] if diagnostics else []
        stop = set(self.stop_ids)
        max_a, max_b = self.max_model_len
        for i, seq in enumerate(active):
            tok = cols[0][i]
            out = seq.out
            out.token_ids.append(tok)
            out.alpha_history.append(cols[1][i])
            out.logp_theta.append(cols[2][i])
            out.logp_t.append(cols[3][i])
            out.logq.append(cols[4][i])
            out.observed_theta.append(cols[5][i])
            out.observed_t.append(cols[6][i])
            out.fallback.append(cols[7][i])
            for name, col in zip(DIAGNOSTIC_NAMES, diag_cols, strict=False):
                seq.diag.setdefault(name, []).append(col[i])
            seq.ctx_theta += f",{tok}"
            seq.ctx_t += f",{tok}"
            seq.len_theta += 1
            seq.len_t += 1
            if tok in stop:
                out.finish_reason, seq.done = "stop", True
            elif len(out.token_ids) >= seq.max_tokens or seq.len_theta >= max_a or seq.len_t >= max_b:
                out.finish_reason, seq.done = "length", True

    def _fail(self, seq: _Seq, err: BaseException) -> None:
        seq.out.finish_reason = "error"
        seq.out.error = f"{type(err).__name__}: {err}"
        seq.done = True

    async def _finish(self, seq: _Seq) -> None:
        out = seq.out
        if seq.diag:
            out.diagnostics = {name: summarise(values) for name, values in seq.diag.items()}
        if out.finish_reason == "error":
            return
        text_ids = out.token_ids[:-1] if out.finish_reason == "stop" else out.token_ids
        try:
            out.generated_text = await self.theta.detokenize(text_ids) if text_ids else ""
        except APIError as err:
            self._fail(seq, err)

    def _count_finished(self, out: GenerationOutput) -> None:
        s = self.stats
        s.sequences += 1
        s.errors += out.failed
        s.tokens += len(out.token_ids)
        s.alpha_sum += sum(out.alpha_history)

    def _postfix(self) -> dict[str, str]:
        st = self.get_statistics()
        return {"tok/s": f"{st['tokens_per_second']:.0f}", "mean α": f"{st['mean_alpha']:.3f}"}


def _progress(total: int, show: bool) -> Any:
    from tqdm.auto import tqdm

    # disable=None: show on a terminal only.
    return tqdm(total=total, unit="seq", disable=None if show else True, dynamic_ncols=True, smoothing=0.1)


async def generate_with_dual_prompts(
    prompts_theta: Sequence[Prompt],
    prompts_t: Sequence[Prompt],
    config: CoordinatorConfig | None = None,
    **kwargs: Any,
) -> list[GenerationOutput]:
    """One call: start a coordinator, generate, close it. ``kwargs`` go to
    :meth:`DualVLLMCoordinator.generate_batch_dual_prompts`."""
    async with DualVLLMCoordinator(config) as coord:
        return await coord.generate_batch_dual_prompts(prompts_theta, prompts_t, **kwargs)


EnhancedDualVLLMCoordinator = DualVLLMCoordinator
