"""The gateway's :class:`~.sampler.Sampler` on the round engine: each choice is one work
item of a serving run (:meth:`Coordinator.serving`), so every request in flight shares
the batched rounds.

What a choice draws:

- **Key.** The draw at a position is keyed by (the run's seed, the item's key, position)
  (docs/design.md, section 1.8). With an extension ``id``, choice 0's key is
  ``stable_key(id)``, the key ``dualsample generate`` gives an input line with that id,
  so it draws that line's record; choice ``i > 0`` is keyed by ``stable_key((id, i))``.
  Without an id, a request with ``seed`` is keyed by ``stable_key(("seed", seed, i))``
  (the same tokens whatever else is in flight), and one with neither by a random key.
- **Sampling parameters.** ``temperature`` multiplies both models' temperatures, as a
  generate call's does. ``top_p``, ``top_k``, ``min_p`` pass only at their neutral values
  (``top_k`` -1, 0 or at least the vocabulary; ``top_p`` 1; ``min_p`` 0); any other value
  is a 400 naming it, as is ``temperature`` 0 (greedy), ``logprobs`` (or
  ``top_logprobs``) above 0 alternatives, and ``min_tokens`` above 1.
- **Log probabilities.** Each token's ``logprob`` is the record's ``logq``: log q* of the
  law it was drawn from, after the temperature; α, log π_θ and log π_t (the record's
  ``logp_theta`` and ``logp_t``) and whether each model listed the token ride along.
- **Text and stops.** Text comes from the base's detokenizer. Stop strings are found in
  the text as tokens arrive: the sequence is dropped there, and streamed text is held
  back while it could still become one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..engine.coordinator import Coordinator
from ..engine.sequence import WorkItem, stable_key
from ..engine.serving import Serving
from ..exceptions import APIError, BadRequestError, InvalidInputError
from ..io.record import GenerationOutput
from .errors import GatewayError, RequestError, UpstreamError
from .metrics import GatewayMetrics
from .sampler import ChoiceResult, FinishReason, Prompt, SampleRequest, TokenResult

__all__ = ["EngineSampler", "choice_key"]

# Token texts remembered for log probability keys (one detokenize call each otherwise).
PIECE_CACHE = 65536


def choice_key(req: SampleRequest, choice_index: int) -> int:
    """The key of choice `choice_index`'s draws (see the module's docstring)."""
    if req.id is not None:
        return stable_key(req.id) if choice_index == 0 else stable_key((req.id, choice_index))
    if req.seed is not None:
        return stable_key(("seed", req.seed, choice_index))
    return secrets.randbits(63)


def _server(err: APIError) -> str:
    if err.request is None:
        return "upstream"
    parts = urlsplit(err.request[1])
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else err.request[1]


def gateway_error(err: BaseException, metrics: GatewayMetrics | None = None) -> GatewayError:
    """The answer for an engine error: bad input (or a server's 400) a 400, a server that
    stayed down or answered badly a 503 naming it."""
    if isinstance(err, GatewayError):
        return err
    if isinstance(err, InvalidInputError):
        return RequestError(str(err))
    if isinstance(err, BadRequestError):
        return RequestError(f"{_server(err)} refused the request: {err.message}")
    if isinstance(err, APIError):
        server = _server(err)
        if metrics is not None:
            metrics.upstream_errors.labels(server).inc()
        return UpstreamError(server, err.message)
    return GatewayError(f"{type(err).__name__}: {err}", status=500, type_="InternalServerError")


class EngineSampler:
    """Choices drawn from q* by a serving run.

    Args:
        coordinator: a started coordinator (its servers, teachers and settings).
        serving: its serving run, entered.
        teacher_system: a system message put first in the teacher's messages of every
            chat request (the base never sees it).
        metrics: where upstream errors are counted.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        serving: Serving,
        teacher_system: str | None = None,
        metrics: GatewayMetrics | None = None,
    ) -> None:
        self.coord = coordinator
        self.serving = serving
        self.teacher_system = teacher_system
        self.metrics = metrics
        self._pieces: dict[int, str] = {}

    # ------------------------------------------------------------ checks
    def check(self, req: SampleRequest) -> None:
        """Refuse what the gateway cannot honour, naming the field."""
        sglang = req.route == "sglang_generate"
        if req.temperature is not None and req.temperature == 0:
            raise RequestError("temperature 0 (greedy decoding) is not supported by the gateway: "
                               "q* is sampled, give a positive temperature", "temperature")  # fmt: skip
        if req.top_p is not None and req.top_p != 1:
            raise RequestError(f"top_p {req.top_p} is not supported by the gateway: q* is not truncated "
                               "(only top_p 1 passes)", "top_p")  # fmt: skip
        vocab = self.coord.info[0].vocab_size if self.coord.info is not None else None
        if req.top_k is not None and req.top_k > 0 and (vocab is None or req.top_k < vocab):
            raise RequestError(f"top_k {req.top_k} is not supported by the gateway: q* is not truncated "
                               "(only -1, 0 or at least the vocabulary pass)", "top_k")  # fmt: skip
        if req.min_p is not None and req.min_p != 0:
            raise RequestError(f"min_p {req.min_p} is not supported by the gateway: q* is not truncated "
                               "(only min_p 0 passes)", "min_p")  # fmt: skip
        if req.logprobs is not None and req.logprobs > 0:
            name = {"chat": "top_logprobs", "sglang_generate": "top_logprobs_num"}.get(req.route, "logprobs")
            raise RequestError(f"{name} {req.logprobs}: alternatives are not served by the gateway; ask for the "
                               "sampled token's log probability only (0)", name)  # fmt: skip
        if req.min_tokens > 1:
            name = "min_new_tokens" if sglang else "min_tokens"
            raise RequestError(f"{name} {req.min_tokens} is not supported by the gateway: it would change the "
                               "law of the first tokens", name)  # fmt: skip
        if req.route == "chat":
            if not req.add_generation_prompt or req.continue_final_message:
                raise RequestError("only add_generation_prompt true without continue_final_message is supported",
                                   "add_generation_prompt")  # fmt: skip
            if req.tools:
                raise RequestError("tools are not supported by the gateway", "tools")
            if req.chat_template_kwargs:
                raise RequestError("chat_template_kwargs are not supported by the gateway", "chat_template_kwargs")

    # ------------------------------------------------------------ Sampler
    async def tokenize(self, req: SampleRequest) -> list[list[int]]:
        """The base's ids of each prompt, checked (see :class:`~.sampler.Sampler`)."""
        self.check(req)
        coord = self.coord
        assert coord.info is not None
        name = "messages" if req.route == "chat" else "prompt"
        info = coord.info[0]

        async def one(p: Prompt) -> list[int]:
            value: Any = p.text if p.text is not None else p.token_ids
            if p.messages is not None:
                value = await coord.base.tokenize(messages=[dict(m) for m in p.messages])
            return await coord.prompt_ids(coord.base, list(value) if p.text is None else value, name, info)

        try:
            return list(await asyncio.gather(*(one(p) for p in req.prompts)))
        except (APIError, InvalidInputError) as err:
            raise gateway_error(err, self.metrics) from None

    async def detokenize(self, token_ids: list[int]) -> str:
        try:
            return await self.coord.base.detokenize(token_ids)
        except APIError as err:
            raise gateway_error(err, self.metrics) from None

    async def _teacher_prompt(self, req: SampleRequest, choice_index: int, item: WorkItem) -> None:
        """The teacher's context: the request's teacher prompt, else the base's prompt;
        messages rendered by each teacher's own chat template (with the teacher's system
        message first)."""
        own = req.teacher_prompt(choice_index)
        prompt = own if own is not None else req.prompts[req.prompt_index(choice_index)]
        if prompt.messages is None:
            item.prompt_t = prompt.text if prompt.text is not None else list(prompt.token_ids or ())
            return
        messages = [dict(m) for m in prompt.messages]
        if self.teacher_system is not None:
            messages.insert(0, {"role": "system", "content": self.teacher_system})
        routes = self.coord.routes
        assert routes is not None
        lanes = routes.route(item, "").lanes
        ids = await asyncio.gather(*(lane.replicas.tokenize(messages=messages) for lane in lanes))
        item.teacher_prompts = {lane.name: list(i) for lane, i in zip(lanes, ids, strict=True)}
        item.prompt_t = item.teacher_prompts[lanes[0].name]

    async def sample(
        self,
        req: SampleRequest,
        choice_index: int,
        prompt_ids: list[int],
        on_token: Callable[[TokenResult], None] | None = None,
    ) -> ChoiceResult:
        """Choice `choice_index` of `req`, its tokens passed to `on_token` as drawn."""
        arrived: asyncio.Queue[tuple[GenerationOutput, int, str | None]] = asyncio.Queue()

        def seen(out: GenerationOutput) -> None:
            arrived.put_nowait((out, len(out.token_ids) - 1, out.finish_reason))

        item = WorkItem(
            choice_key(req, choice_index), list(prompt_ids), list(prompt_ids), req.id,
            teacher=req.teacher, mix=dict(req.teachers) if req.teachers is not None else None,
            max_tokens=req.max_tokens, temperature=req.temperature, stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos, on_token=seen,
        )  # fmt: skip
        try:
            await self._teacher_prompt(req, choice_index, item)
        except (APIError, InvalidInputError) as err:
            raise gateway_error(err, self.metrics) from None
        text = _Text(self, req, on_token)
        task = asyncio.ensure_future(self.serving.generate(item))
        try:
            while True:
                waiter = asyncio.ensure_future(arrived.get())
                await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not waiter.done():
                    waiter.cancel()
                    await asyncio.gather(waiter, return_exceptions=True)
                got = [waiter.result()] if waiter.done() and not waiter.cancelled() else []
                while not arrived.empty():
                    got.append(arrived.get_nowait())
                if got and await text.take(got):
                    break  # a stop string: the sequence is dropped below
                if task.done() and arrived.empty():
                    break
        finally:
            if not task.done():
                task.cancel()
            result = await asyncio.gather(task, return_exceptions=True)
        out = result[0]
        if text.stopped is None:
            if isinstance(out, BaseException):
                raise gateway_error(out, self.metrics) if not isinstance(out, asyncio.CancelledError) else out
            if out.finish_reason == "error":
                raise gateway_error(item.failure or RuntimeError(out.error or "failed"), self.metrics)
        return await text.result(item, out if isinstance(out, GenerationOutput) else None)

    async def piece(self, token_id: int) -> str:
        """A token's own text (cached)."""
        known = self._pieces.get(token_id)
        if known is None:
            known = await self.detokenize([token_id])
            if len(self._pieces) >= PIECE_CACHE:
                self._pieces.pop(next(iter(self._pieces)))
            self._pieces[token_id] = known
        return known


class _Text:
    """One choice's tokens and text as they arrive: stop strings found, text held back
    while it could still become one (or is an incomplete character)."""

    def __init__(self, sampler: EngineSampler, req: SampleRequest, on_token: Callable[[TokenResult], None] | None):
        self.sampler, self.req, self.on_token = sampler, req, on_token
        self.tokens: list[TokenResult] = []
        self.ids: list[int] = []
        self.sent = ""
        self.stopped: tuple[str, int] | None = None  # (stop string, where it starts)
        self.final_stop = False  # the last token ended the sequence as a stop id
        self.hold = max((len(s) for s in req.stop), default=1) - 1
        self.incremental = req.stream or bool(req.stop)
        self.want_pieces = req.logprobs is not None and (not req.tokens_as_ids or req.return_text_in_logprobs)

    async def _token(self, out: GenerationOutput, k: int) -> TokenResult:
        tid = out.token_ids[k]
        pieces = {tid: await self.sampler.piece(tid)} if self.want_pieces else {}
        return TokenResult(
            token_id=tid, text="", logprob=out.logq[k], pieces=pieces, alpha=out.alpha_history[k],
            logp_base=out.logp_theta[k], logp_teacher=out.logp_t[k], observed_base=bool(out.observed_theta[k]),
            observed_teacher=bool(out.observed_t[k]), fallback=bool(out.fallback[k]),
        )  # fmt: skip

    async def take(self, got: Sequence[tuple[GenerationOutput, int, str | None]]) -> bool:
        """Take newly drawn tokens; True once a stop string has ended the choice."""
        new = [await self._token(out, k) for out, k, _ in got]
        self.final_stop = got[-1][2] == "stop"
        if not self.incremental:
            self.tokens += new
            if self.on_token is not None:  # counted as drawn (the answer's text comes at the end)
                for tok in new:
                    self.on_token(tok)
            return False
        start = len(self.ids)
        self.ids += [t.token_id for t in new]
        text_ids = self.ids[:-1] if self.final_stop else self.ids
        full = await self.sampler.detokenize(text_ids) if text_ids else ""
        cut = len(full)
        if self.req.stop:
            # Only a match that ends in the new text can be new.
            begin = max(0, len(self.sent) - self.hold)
            hits = [(full.find(s, begin), s) for s in self.req.stop]
            hits = [(i, s) for i, s in hits if i >= 0]
            if hits:
                at, s = min(hits)
                self.stopped = (s, at)
                # The tokens up to the one that completed the match.
                end = at + len(s)
                keep = len(new)
                for n in range(1, len(new) + 1):
                    part = self.ids[: start + n]
                    if len(await self.sampler.detokenize(part)) >= end:
                        keep = n
                        break
                new = new[:keep]
                self.ids = self.ids[: start + keep]
                self.final_stop = False
                full = full[: at + len(s)] if self.req.include_stop_str_in_output else full[:at]
                cut = len(full)
        if self.stopped is None:
            cut = len(full) - self.hold if self.req.stop else len(full)
            while cut > 0 and full[cut - 1] == "\ufffd":
                cut -= 1
        if not full.startswith(self.sent):
            cut = len(self.sent)  # the detokenizer rewrote earlier text: wait for the end
            full = self.sent
        text = full[len(self.sent) : max(cut, len(self.sent))]
        self.sent += text
        for i, tok in enumerate(new):
            tok = dataclasses.replace(tok, text=text if i == len(new) - 1 else "")
            self.tokens.append(tok)
            if self.on_token is not None:
                self.on_token(tok)
        return self.stopped is not None

    async def result(self, item: WorkItem, out: GenerationOutput | None) -> ChoiceResult:
        """The finished choice (a stream's finishing event carries the text held back)."""
        finish: FinishReason
        stop_reason: int | str | None = None
        if self.stopped is not None:
            finish, stop_reason, final = "stop", self.stopped[0], self.sent
        else:
            assert out is not None
            reason = out.finish_reason
            finish = reason if reason in ("stop", "length") else "abort"  # type: ignore[assignment]
            ids = out.token_ids
            if reason == "stop" and ids and ids[-1] in item.stop_token_ids:
                stop_reason = ids[-1]
            # The engine's finish step has detokenised a finished output already.
            final = out.generated_text
        teacher = None
        if out is not None:
            teacher = out.teacher
            if out.teachers is not None:
                teacher = ",".join(f"{name}={w:g}" for name, w in out.teachers.items())
        return ChoiceResult(tuple(self.tokens), final, finish, stop_reason, teacher)
