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
  generate call's does; ``temperature`` 0 is greedy (the most probable token of q*).
  ``min_p``, ``top_k`` and ``top_p`` are applied to q* by the kernel as vLLM applies them
  to its distribution (in that order), and the token is drawn from the law after them;
  their neutral values (``top_k`` -1, 0 or at least the vocabulary; ``top_p`` 1;
  ``min_p`` 0) change nothing. ``min_tokens`` above 1 is a 400 naming it.
- **Log probabilities.** Each token's ``logprob`` is the record's ``logq``: log q* of the
  law it was drawn from, after the sampling parameters; ``logprobs`` N gives the N most
  probable tokens of that same law. α, log π_θ and log π_t (the record's ``logp_theta``
  and ``logp_t``) and whether each model listed the token ride along.
- **Text and stops.** Text comes from the base's detokenizer. A whole answer's is the
  engine's decode of the finished output. A streamed one (or one cut by stop strings)
  is built as tokens arrive: from each token's own text, cached, where the base's
  tokenizer is additive (found once by a probe), so a step asks the base nothing; else
  by decoding the output so far at each step. Stop strings are found in that text: the
  sequence is dropped there, and streamed text is held back while it could still become
  one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..engine.coordinator import Coordinator
from ..engine.sequence import Truncation, WorkItem, stable_key
from ..engine.serving import Serving, ServingStoppedError
from ..exceptions import APIError, BadRequestError, InvalidInputError
from ..io.record import GenerationOutput
from .errors import GatewayError, RequestError, UpstreamError
from .metrics import GatewayMetrics
from .sampler import ChoiceResult, FinishReason, Prompt, SampleRequest, TokenResult

__all__ = ["EngineSampler", "choice_key"]

log = logging.getLogger(__name__)

# Token texts remembered for log probability keys and streamed text (one detokenize call
# each otherwise).
PIECE_CACHE = 65536
# One whole answer's text from pieces in this many is checked against the base's decode.
CHECK_EVERY = 64
# Token texts asked for at once (a whole answer's new tokens and their alternatives).
PIECE_REQUESTS = 16
REPLACEMENT = "\ufffd"  # what a decoder gives for bytes that are not a whole character
# Text whose pieces do not concatenate to its decode under a SentencePiece tokenizer (a
# word's leading space), one that cleans up spaces (" ." and " 's"), or in the middle of
# a character of several bytes.
ADDITIVITY_PROBE = (
    "Hello , world . It 's  two  spaces,\ttab\nline; don 't (x) [y] 12345 \u00e9t\u00e9 \u4e2d\u6587 \U0001f642!"
)


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


def gateway_error(err: BaseException) -> GatewayError:
    """The answer for an engine error: bad input (or a server's 400) a 400, a server that
    stayed down or answered badly a 503 naming it."""
    if isinstance(err, GatewayError):
        return err
    if isinstance(err, InvalidInputError):
        return RequestError(str(err))
    if isinstance(err, ServingStoppedError):
        return GatewayError(str(err), status=503, type_="ServiceUnavailableError")
    if isinstance(err, BadRequestError):
        return RequestError(f"{_server(err)} refused the request: {err.message}")
    if isinstance(err, APIError):  # each failed attempt was counted as it happened
        return UpstreamError(_server(err), err.message)
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
        self._additive: bool | None = None
        self._probe_lock = asyncio.Lock()
        self._texts = 0  # whole answers' texts made from pieces
        self._checks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ checks
    def check(self, req: SampleRequest) -> None:
        """Refuse what the gateway cannot honour, naming the field."""
        sglang = req.route == "sglang_generate"
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

    def _truncation(self, req: SampleRequest) -> Truncation | None:
        """The request's top_k, top_p and min_p for q* (None where all are neutral; a
        top_k of at least the vocabulary keeps every candidate)."""
        vocab = self.coord.info[0].vocab_size if self.coord.info is not None else None
        top_k = req.top_k or 0
        if vocab is not None and top_k >= vocab:
            top_k = 0
        if req.temperature == 0:  # greedy: the most probable token of q* (drawn among ties)
            top_k = 1
        law = Truncation(top_k, 1.0 if req.top_p is None else req.top_p, req.min_p or 0.0)
        return None if law.neutral else law

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
            raise gateway_error(err) from None

    async def detokenize(self, token_ids: list[int]) -> str:
        try:
            return await self.coord.base.detokenize(token_ids)
        except APIError as err:
            raise gateway_error(err) from None

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
        """Choice `choice_index` of `req`, its tokens passed to `on_token` as drawn (when
        streamed or cut by stop strings; else all at once when the choice ends)."""
        incremental = req.stream or bool(req.stop)
        # Drawn tokens as (output, index, finish reason); None once the sequence has ended.
        arrived: asyncio.Queue[tuple[GenerationOutput, int, str | None] | None] = asyncio.Queue()

        def seen(out: GenerationOutput) -> None:
            arrived.put_nowait((out, len(out.token_ids) - 1, out.finish_reason))

        item = WorkItem(
            choice_key(req, choice_index), list(prompt_ids), list(prompt_ids), req.id,
            teacher=req.teacher, mix=dict(req.teachers) if req.teachers is not None else None,
            max_tokens=req.max_tokens, temperature=req.temperature or None, stop_token_ids=tuple(req.stop_token_ids),
            ignore_eos=req.ignore_eos, on_token=seen if incremental else None, truncation=self._truncation(req),
            alternatives=req.logprobs or 0,
        )  # fmt: skip
        try:
            await self._teacher_prompt(req, choice_index, item)
            additive = await self.additive()
            text = _Text(self, req, item, on_token, incremental and additive)
            if additive:
                # The finished text from the cached pieces too: no /detokenize request, so
                # the answer leaves a round sooner (one in CHECK_EVERY is decoded after
                # the fact, which keeps the pieces honest).
                item.text = self.text_of
        except (APIError, InvalidInputError) as err:
            raise gateway_error(err) from None
        try:
            task = self.serving.submit(item)
        except ServingStoppedError as err:
            raise gateway_error(err) from None
        task.add_done_callback(lambda _: arrived.put_nowait(None))
        try:
            # Woken once per round that drew tokens for it (a whole answer: only at its end).
            ended = False
            while not ended:
                got = [await arrived.get()]
                while not arrived.empty():
                    got.append(arrived.get_nowait())
                ended = got[-1] is None
                drawn = [g for g in got if g is not None]
                if drawn and await text.take(drawn):
                    break  # a stop string: the sequence is dropped below
        except APIError as err:  # the base's detokenizer, for the text so far
            raise gateway_error(err) from None
        finally:
            if not task.done():
                task.cancel()  # a future: cancelled at once, its sequence dropped at its next round
        out: GenerationOutput | BaseException = (
            asyncio.CancelledError() if task.cancelled() else (task.exception() or task.result())
        )
        if text.stopped is None:
            if isinstance(out, BaseException):
                raise gateway_error(out) if not isinstance(out, asyncio.CancelledError) else out
            if out.finish_reason == "error":
                raise gateway_error(item.failure or RuntimeError(out.error or "failed"))
        try:
            if not incremental and isinstance(out, GenerationOutput):
                await text.whole(out)
            return await text.result(item, out if isinstance(out, GenerationOutput) else None)
        except APIError as err:
            raise gateway_error(err) from None

    async def additive(self) -> bool:
        """Whether the base's text of any ids is the concatenation of each id's own text
        (byte-level BPE tokenizers, without clean-up of spaces), so that streamed text
        needs no detokenize request per step. Found once, on a probe text with the
        cases that break it (a leading-space word piece, spaces before punctuation,
        characters of several bytes); a choice whose pieces disagree with its final text
        turns it off (:meth:`distrust_pieces`)."""
        async with self._probe_lock:
            if self._additive is None:
                try:
                    ids = await self.coord.base.tokenize(ADDITIVITY_PROBE, add_special_tokens=False)
                    pieces = _Pieces(self)
                    await pieces.add(ids)
                    self._additive = pieces.run_from is None and pieces.text(len(ids)) == await self.detokenize(ids)
                except APIError as err:
                    raise gateway_error(err) from None
                if not self._additive:
                    log.info("gateway: the base's tokenizer is not additive; streamed text is detokenized per step")
            return self._additive

    async def text_of(self, token_ids: list[int]) -> str:
        """The text of ids from their cached pieces (an additive tokenizer's), or, where a
        piece is not whole characters, the base's decode (one request, as without pieces).
        One in CHECK_EVERY made from pieces is also decoded by the base, after the fact, to
        keep the pieces honest."""
        pieces = await self.pieces(token_ids)
        if any(REPLACEMENT in p for p in pieces):
            return await self.detokenize(token_ids)
        text = "".join(pieces)
        self._texts += 1
        if self._texts % CHECK_EVERY == 0:
            task = asyncio.ensure_future(self._check(token_ids, text))
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)
        return text

    async def _check(self, token_ids: list[int], text: str) -> None:
        try:
            decoded = await self.detokenize(token_ids)
        except GatewayError:
            return  # the base is down: the request that needs it will say so
        if decoded != text:
            self.distrust_pieces(text, decoded)

    def distrust_pieces(self, sent: str, final: str) -> None:
        """A choice's text from pieces was not a prefix of its whole decode: detokenize
        per step from now on."""
        if self._additive:
            log.warning("gateway: streamed text from token pieces (%r...) differs from the decoded text (%r...); "
                        "detokenizing per step from now on", sent[:40], final[:40])  # fmt: skip
        self._additive = False

    async def piece(self, token_id: int) -> str:
        """A token's own text (cached)."""
        known = self._pieces.get(token_id)
        if known is None:
            known = await self.detokenize([token_id])
            if len(self._pieces) >= PIECE_CACHE:
                self._pieces.pop(next(iter(self._pieces)))
            self._pieces[token_id] = known
        return known

    async def pieces(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text, those not cached asked for at once (at most
        PIECE_REQUESTS at a time)."""
        try:  # the usual case, every piece known: no set to build
            return [self._pieces[t] for t in token_ids]
        except KeyError:
            pass
        missing = [t for t in dict.fromkeys(token_ids) if t not in self._pieces]
        if missing:
            slots = asyncio.Semaphore(PIECE_REQUESTS)

            async def one(t: int) -> None:
                async with slots:
                    await self.piece(t)

            await asyncio.gather(*(one(t) for t in missing))
        return [self._pieces[t] if t in self._pieces else await self.piece(t) for t in token_ids]


class _Pieces:
    """A choice's text assembled from its tokens' own texts (cached pieces), for a
    tokenizer whose text is the concatenation of its tokens' (see
    :meth:`EngineSampler.additive`).

    A run of tokens whose pieces are not whole characters (a character of several bytes
    split across tokens) is decoded together, as each of its tokens arrives, until it
    ends in a whole character: the run's text then belongs to its last token. While a
    run is open, its decode so far (ending in U+FFFD) stands for the text of its tokens,
    so that a stop string inside it is found where decoding the whole output would find
    it."""

    def __init__(self, sampler: EngineSampler) -> None:
        self.sampler = sampler
        self.ids: list[int] = []
        # The text so far, and where each token's text ends in it ("" inside a run): a
        # step's text is one slice of it, where a join of every piece so far went through
        # a Python list per step (both are linear in the answer's length, as is the
        # caller's comparison with the text already sent; the slice is cheaper).
        self.joined = ""
        self.ends: list[int] = []
        # For a token inside a run (closed or open): where the run starts, and the run's
        # decode up to and including the token.
        self.partial: dict[int, tuple[int, str]] = {}
        self.run_from: int | None = None  # where an open run starts

    async def add(self, ids: Sequence[int]) -> None:
        for tid, piece in zip(ids, await self.sampler.pieces(ids), strict=True):
            self.ids.append(tid)
            if self.run_from is None and REPLACEMENT not in piece:
                self._append(piece)
                continue
            if self.run_from is None:
                self.run_from = len(self.ids) - 1
            text = await self.sampler.detokenize(self.ids[self.run_from :])
            if text.endswith(REPLACEMENT):  # still inside a character
                self._append("")
                self.partial[len(self.ids) - 1] = (self.run_from, text)
            else:
                self._append(text)
                self.run_from = None

    def _append(self, text: str) -> None:
        self.joined += text
        self.ends.append(len(self.joined))

    def _upto(self, count: int) -> str:
        return self.joined[: self.ends[count - 1]] if count else ""

    def text(self, count: int) -> str:
        """The text of the first `count` tokens, as decoding them would give it."""
        if count and count - 1 in self.partial:
            start, so_far = self.partial[count - 1]
            return self._upto(start) + so_far
        return self._upto(count)


class _Text:
    """One choice's tokens and text as they arrive: stop strings found, text held back
    while it could still become one (or is an incomplete character).

    The text of the tokens so far comes from their cached pieces where the base's
    tokenizer is additive, else from detokenizing the whole output at each step."""

    def __init__(
        self,
        sampler: EngineSampler,
        req: SampleRequest,
        item: WorkItem,
        on_token: Callable[[TokenResult], None] | None,
        additive: bool,
    ):
        self.sampler, self.req, self.item, self.on_token = sampler, req, item, on_token
        self.tokens: list[TokenResult] = []
        self.ids: list[int] = []
        self.pieces = _Pieces(sampler) if additive else None
        self.sent = ""
        self.stopped: tuple[str, int] | None = None  # (stop string, where it starts)
        self.final_stop = False  # the last token ended the sequence as a stop id
        self.hold = max((len(s) for s in req.stop), default=1) - 1
        self.want_pieces = req.logprobs is not None and (not req.tokens_as_ids or req.return_text_in_logprobs)

    async def _texts(self, got: Sequence[tuple[GenerationOutput, int]]) -> dict[int, str]:
        """The own texts of the tokens at `got` and of their alternatives, asked for at
        once, where the answer names them (else none)."""
        if not self.want_pieces:
            return {}
        top = self.item.top if self.item.alternatives else None
        ids = [out.token_ids[k] for out, k in got]
        if top is not None:
            ids += [t for _, k in got for t, _ in top[k]]
        ids = list(dict.fromkeys(ids))
        return dict(zip(ids, await self.sampler.pieces(ids), strict=True))

    def _token(self, out: GenerationOutput, k: int, texts: dict[int, str], text: str = "") -> TokenResult:
        """The token at `k` of `out`, its texts from `texts` (see :meth:`_texts`)."""
        tid = out.token_ids[k]
        top = self.item.top[k] if self.item.alternatives else ()
        pieces: dict[int, str] = {}
        if self.want_pieces:
            pieces = {tid: texts[tid]}
            for t, _ in top:
                pieces[t] = texts[t]
        return TokenResult(
            token_id=tid, text=text, logprob=out.logq[k], top=top, pieces=pieces, alpha=out.alpha_history[k],
            logp_base=out.logp_theta[k], logp_teacher=out.logp_t[k], observed_base=bool(out.observed_theta[k]),
            observed_teacher=bool(out.observed_t[k]), fallback=bool(out.fallback[k]),
        )  # fmt: skip

    async def _text_of(self, count: int) -> str:
        """The text of the first `count` tokens."""
        if self.pieces is not None:
            return self.pieces.text(count)
        return await self.sampler.detokenize(self.ids[:count]) if count else ""

    async def whole(self, out: GenerationOutput) -> None:
        """Take a finished choice's tokens at once (its text is the engine's)."""
        texts = await self._texts([(out, k) for k in range(len(out.token_ids))])
        for k in range(len(out.token_ids)):
            tok = self._token(out, k, texts)
            self.tokens.append(tok)
            if self.on_token is not None:
                self.on_token(tok)

    async def take(self, got: Sequence[tuple[GenerationOutput, int, str | None]]) -> bool:
        """Take newly drawn tokens; True once a stop string has ended the choice."""
        self.final_stop = got[-1][2] == "stop"
        start = len(self.ids)
        self.ids += [out.token_ids[k] for out, k, _ in got]
        new = len(got)  # of them, the tokens kept
        if self.pieces is not None:
            await self.pieces.add(self.ids[start:])
        # A stop id's own text is not output.
        full = await self._text_of(len(self.ids) - 1 if self.final_stop else len(self.ids))
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
                keep = new
                for n in range(1, new + 1):
                    if len(await self._text_of(start + n)) >= end:
                        keep = n
                        break
                new = keep
                self.ids = self.ids[: start + keep]
                self.final_stop = False
                full = full[: at + len(s)] if self.req.include_stop_str_in_output else full[:at]
                cut = len(full)
        if self.stopped is None:
            cut = len(full) - self.hold if self.req.stop else len(full)
            while cut > 0 and full[cut - 1] == REPLACEMENT:
                cut -= 1
            if self.pieces is None:
                # A decoder that cleans up spaces (" ." to ".") rewrites a trailing space
                # once the next token comes: it waits for that token.
                while cut > 0 and full[cut - 1].isspace():
                    cut -= 1
        if not full.startswith(self.sent):
            cut = len(self.sent)  # the detokenizer rewrote earlier text: wait for the end
            full = self.sent
        text = full[len(self.sent) : max(cut, len(self.sent))]
        self.sent += text
        texts = await self._texts([(out, k) for out, k, _ in got[:new]])
        for i, (out, k, _) in enumerate(got[:new]):
            tok = self._token(out, k, texts, text if i == new - 1 else "")
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
            if self.pieces is not None:  # the text came from pieces alone: check it once
                decoded = await self.sampler.detokenize(self.ids) if self.ids else ""
                if not decoded.startswith(final):
                    self.sampler.distrust_pieces(final, decoded)
        else:
            assert out is not None
            reason = out.finish_reason
            finish = reason if reason in ("stop", "length") else "abort"  # type: ignore[assignment]
            ids = out.token_ids
            if reason == "stop" and ids and ids[-1] in item.stop_token_ids:
                stop_reason = ids[-1]
            # The engine's finish step has detokenised a finished output already.
            final = out.generated_text
            if self.pieces is not None and not final.startswith(self.sent):
                # Pieces gave text the whole decode does not: stop trusting them.
                self.sampler.distrust_pieces(self.sent, final)
        teacher = None
        if out is not None:
            teacher = out.teacher
            if out.teachers is not None:
                teacher = ",".join(f"{name}={w:g}" for name, w in out.teachers.items())
        return ChoiceResult(tuple(self.tokens), final, finish, stop_reason, teacher)
