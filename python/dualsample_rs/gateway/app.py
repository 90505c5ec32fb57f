"""The gateway's HTTP application (aiohttp): generation routes answered from q*, the
base's informational routes and the engines' control routes forwarded, metrics, a
queue limit, and cancellation of a departed client's sequences."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from aiohttp.typedefs import Handler

from .errors import ErrorShape, GatewayError, busy
from .metrics import CONTENT_TYPE, GatewayMetrics
from .passthrough import ENGINE_ROUTES, FIRST_REPLICA_ROUTES, Forwarder, Reply
from .request import Limits, parse_body
from .response import Answer, Stream, dumps, render
from .sampler import ChoiceResult, Route, Sampler, SampleRequest, TokenResult

__all__ = ["GENERATION_ROUTES", "GatewayOptions", "make_app"]

log = logging.getLogger("dualsample_rs.gateway")

GENERATION_ROUTES: dict[str, Route] = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat",
    "/inference/v1/generate": "vllm_generate",
    "/generate": "sglang_generate",
}
METRICS_KEY = web.AppKey("metrics", GatewayMetrics)
# The status a request is counted under when its client left before the answer (nginx's).
CLIENT_GONE = 499


@dataclass(frozen=True)
class GatewayOptions:
    """Settings of the HTTP layer.

    Attributes:
        flavor: the base's engine, whose error body the OpenAI routes answer with
            (``vllm``: ``{"error": {...}}``; ``sglang``: flat ``{"object": "error", ...}``);
            None: the base's dialect under :func:`~dualsample_rs.gateway.open_gateway`,
            else ``vllm``.
        model_name: the model name answers carry when the request names none; None: the
            base's model under :func:`~dualsample_rs.gateway.open_gateway`, else
            ``dualsample``.
        limits: caps on one request (log probabilities, n, prompts).
        max_concurrent_requests: requests sampled at once; more wait in the queue.
        max_queued_requests: requests that may wait; past it, 503 with ``Retry-After``.
        retry_after: the ``Retry-After`` seconds of that answer.
        upstream_timeout: seconds a forwarded call may take.
        client_max_size: the largest request body accepted, in bytes.
        stream_interval: tokens per streamed event, as the engines' ``--stream-interval``:
            a choice's first token is sent at once, then whenever this many are unsent,
            and the rest with its end. A request's ``stream_interval`` raises it on the
            OpenAI routes (vLLM's rule) and replaces it on ``/generate`` (SGLang's).
    """

    flavor: Literal["vllm", "sglang"] | None = None
    model_name: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_concurrent_requests: int = 256
    max_queued_requests: int = 1024
    retry_after: float = 1.0
    upstream_timeout: float = 600.0
    client_max_size: int = 64 * 1024**2
    stream_interval: int = 1


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=dumps(body), status=status, content_type="application/json",
                        headers=headers)  # fmt: skip


class _Admission:
    """At most `limit` requests run; up to `queue` more wait, in arrival order."""

    def __init__(self, limit: int, queue: int, metrics: GatewayMetrics, retry_after: float) -> None:
        self.slots = asyncio.Semaphore(limit)
        self.queue = queue
        self.waiting = 0
        self.metrics = metrics
        self.retry_after = retry_after

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self.slots.locked():
            if self.waiting >= self.queue:
                raise busy(self.retry_after)
            self.waiting += 1
            self.metrics.queue_length.set(self.waiting)
            try:
                await self.slots.acquire()
            finally:
                self.waiting -= 1
                self.metrics.queue_length.set(self.waiting)
        else:
            await self.slots.acquire()
        self.metrics.requests_in_flight.inc()
        try:
            yield
        finally:
            self.metrics.requests_in_flight.dec()
            self.slots.release()


class _Gateway:
    def __init__(
        self,
        sampler: Sampler,
        forwarder: Forwarder,
        options: GatewayOptions,
        metrics: GatewayMetrics,
        on_forwarded: Callable[[str], None] | None = None,
    ) -> None:
        self.on_forwarded = on_forwarded
        self.sampler = sampler
        self.forwarder = forwarder
        self.options = options
        self.metrics = metrics
        self.admission = _Admission(options.max_concurrent_requests, options.max_queued_requests, metrics,
                                    options.retry_after)  # fmt: skip

    def shape(self, route: Route | None) -> ErrorShape:
        if route == "sglang_generate":
            return "sglang-native"
        if route == "vllm_generate":
            return "vllm"
        return self.options.flavor or "vllm"

    def error(self, err: GatewayError, route: Route | None) -> web.Response:
        return _json(err.body(self.shape(route)), status=err.status, headers=err.headers or None)

    def stream_interval(self, req: SampleRequest) -> int:
        """Tokens per streamed event for `req` (see :class:`GatewayOptions`)."""
        own = req.stream_interval
        if own is None:
            return self.options.stream_interval
        return own if req.route == "sglang_generate" else max(own, self.options.stream_interval)

    # ------------------------------------------------------------ generation
    def handler(self, route: Route) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            status = 500
            try:
                response = await self.generate(route, request)
                status = response.status
                return response
            except _ClientLeft as left:  # mid-stream
                status = CLIENT_GONE
                return left.response
            except GatewayError as err:
                status = err.status
                return self.error(err, route)
            except web.HTTPException as err:  # body too large
                status = err.status
                return self.error(GatewayError(err.reason, status=err.status), route)
            except asyncio.CancelledError:  # the client left (handler_cancellation)
                status = CLIENT_GONE
                raise
            except Exception:
                log.exception("gateway: %s failed", route)
                return self.error(GatewayError("Internal server error", status=500, type_="InternalServerError"),
                                  route)  # fmt: skip
            finally:
                self.metrics.requests.labels(route, str(status)).inc()

        return handle

    async def generate(self, route: Route, request: web.Request) -> web.StreamResponse:
        req = parse_body(route, await request.read(), self.options.limits)
        async with self.admission.slot():
            prompt_ids = await self.sampler.tokenize(req)
            echo_texts = None
            if req.echo:
                echo_texts = [
                    p.text if p.text is not None else await self.sampler.detokenize(ids)
                    for p, ids in zip(req.prompts, prompt_ids, strict=True)
                ]
            self.metrics.prompt_tokens.inc(sum(len(p) for p in prompt_ids))
            ans = Answer(req, prompt_ids, req.model or self.options.model_name or "dualsample", echo_texts)
            if req.stream:
                return await self.stream(request, ans)
            choices = await self.run(request, ans, None)
            return _json(render(ans, choices))

    async def _sample(
        self, req: SampleRequest, index: int, prompt: list[int], on_token: Callable[[TokenResult], None]
    ) -> ChoiceResult:
        self.metrics.sequences_in_flight.inc()
        try:
            return await self.sampler.sample(req, index, prompt, on_token)
        except asyncio.CancelledError:
            self.metrics.cancelled.inc()
            raise
        finally:
            self.metrics.sequences_in_flight.dec()

    def _tasks(
        self, ans: Answer, on_token: Callable[[int, TokenResult], None] | None
    ) -> list[asyncio.Task[ChoiceResult]]:
        def callback(index: int) -> Callable[[TokenResult], None]:
            def seen(tok: TokenResult) -> None:
                self.metrics.observe_token(tok)
                if on_token is not None:
                    on_token(index, tok)

            return seen

        return [
            asyncio.ensure_future(self._sample(ans.req, i, ans.prompt_of(i), callback(i)))
            for i in range(ans.req.num_choices)
        ]

    async def run(
        self, request: web.Request, ans: Answer, on_token: Callable[[int, TokenResult], None] | None
    ) -> list[ChoiceResult]:
        """Every choice sampled at once; all dropped if the client leaves."""
        tasks = self._tasks(ans, on_token)
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                exc = t.exception()
                if exc is not None:
                    raise exc
            return [t.result() for t in tasks]
        finally:  # a client that left cancels the handler (handler_cancellation): its choices go
            await _cancel(tasks)

    async def stream(self, request: web.Request, ans: Answer) -> web.StreamResponse:
        # Each choice's events as its tokens make them (built in the token callback, so
        # that a token that completes no event under the stream interval wakes nobody),
        # then its result or failure.
        events: asyncio.Queue[tuple[int, list[Any] | ChoiceResult | BaseException]] = asyncio.Queue()
        stream = Stream(ans, self.stream_interval(ans.req))
        first = [c for i in range(ans.req.num_choices) for c in stream.start(i)]

        def on_token(index: int, tok: TokenResult) -> None:
            chunks = stream.token(index, tok)
            if chunks:
                events.put_nowait((index, chunks))

        tasks = self._tasks(ans, on_token)
        for i, t in enumerate(tasks):
            t.add_done_callback(_on_done(events, i))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            await _send(response, first)
            left = len(tasks)
            failed = False
            while left and not failed:
                arrived = [await events.get()]
                while not events.empty():
                    arrived.append(events.get_nowait())
                # Whatever has arrived goes out in one write.
                chunks: list[Any] = []
                for index, item in arrived:
                    if failed:
                        break
                    if isinstance(item, list):
                        chunks += item
                    elif isinstance(item, ChoiceResult):
                        left -= 1
                        chunks += stream.finish(index, item)
                    else:
                        err = item if isinstance(item, GatewayError) else GatewayError(
                            "Internal server error", status=500, type_="InternalServerError")  # fmt: skip
                        if not isinstance(item, GatewayError):
                            log.error("gateway: a streamed choice failed", exc_info=item)
                        chunks.append(err.body(self.shape(ans.req.route)))
                        failed = True
                if not left and not failed:
                    chunks += stream.end()
                await _send(response, chunks)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (ConnectionResetError, ConnectionError):
            raise _ClientLeft(response) from None  # its sequences are dropped below
        finally:
            await _cancel(tasks)
        return response

    # ------------------------------------------------------------ forwarding
    def _no_base(self) -> web.Response | None:
        """The answer to a forwarded call when there is no base server to forward to."""
        if self.forwarder.base_urls:
            return None
        return self.error(GatewayError("no base server to forward to", status=503, type_="ServiceUnavailableError"),
                          None)  # fmt: skip

    async def forward_every(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._no_base()) is not None:
            return refused
        replies = await self.forwarder.every(request)
        for reply in replies:
            if reply.status == 0:
                return self._unreachable(reply)
            if reply.status >= 400:
                return reply.response()
        if self.on_forwarded is not None:
            self.on_forwarded(request.path)
        return replies[0].response()

    async def forward_first(self, request: web.Request) -> web.StreamResponse:
        if (refused := self._no_base()) is not None:
            return refused
        reply = await self.forwarder.first(request)
        return self._unreachable(reply) if reply.status == 0 else reply.response()

    def _unreachable(self, reply: Reply) -> web.Response:
        err = GatewayError(f"Upstream server {reply.url} is unavailable: {reply.body.decode(errors='replace')}",
                           status=503, type_="ServiceUnavailableError")  # fmt: skip
        return self.error(err, None)

    async def metrics_route(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


class _ClientLeft(Exception):
    """A streaming client left while its answer was being written."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("the client left")
        self.response = response


def _on_done(
    events: asyncio.Queue[tuple[int, list[Any] | ChoiceResult | BaseException]], index: int
) -> Callable[[asyncio.Task[ChoiceResult]], None]:
    def done(task: asyncio.Task[ChoiceResult]) -> None:
        events.put_nowait((index, _outcome(task)))

    return done


def _outcome(task: asyncio.Task[ChoiceResult]) -> ChoiceResult | BaseException:
    if task.cancelled():
        return asyncio.CancelledError()
    err = task.exception()
    return err if err is not None else task.result()


async def _send(response: web.StreamResponse, chunks: list[Any]) -> None:
    """Server-sent events, one per chunk, in one write."""
    if chunks:
        await response.write(b"".join(b"data: " + dumps(c) + b"\n\n" for c in chunks))


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Unknown routes and wrong methods answer JSON, as FastAPI does (``{"detail": ...}``)."""
    try:
        return await handler(request)
    except web.HTTPException as err:
        if err.status < 400:
            raise
        return _json({"detail": err.reason}, status=err.status)


def make_app(
    sampler: Sampler,
    upstream_base_urls: Sequence[str],
    passthrough_paths: Iterable[str] = (),
    *,
    options: GatewayOptions | None = None,
    metrics: GatewayMetrics | None = None,
    on_forwarded: Callable[[str], None] | None = None,
) -> web.Application:
    """The gateway application. Run it with ``handler_cancellation=True`` (as
    :func:`~dualsample_rs.gateway.open_gateway` does): a client that leaves then cancels
    its handler, which drops its sequences before their next round.

    Args:
        sampler: draws the tokens (see :class:`~dualsample_rs.gateway.sampler.Sampler`).
        upstream_base_urls: the base server's replicas; the engines' control routes and
            `passthrough_paths` go to every one (the answer is the first error, else the
            first replica's), ``/v1/models``, ``/tokenize``, ``/detokenize`` and other
            informational routes to the first.
        passthrough_paths: more paths to forward to every replica (e.g. AReaL's
            ``/areal_update_weights``), any method.
        options: the HTTP layer's settings.
        metrics: where to count (a sampler may share it for its upstream calls).
        on_forwarded: called with the path of each control call every replica accepted
            (e.g. to hold rounds while the base is paused).
    """
    options = options or GatewayOptions()
    metrics = metrics or GatewayMetrics()
    forwarder = Forwarder(upstream_base_urls, metrics, options.upstream_timeout)
    gw = _Gateway(sampler, forwarder, options, metrics, on_forwarded)
    app = web.Application(middlewares=[_json_errors], client_max_size=options.client_max_size)
    app[METRICS_KEY] = metrics
    for path, route in GENERATION_ROUTES.items():
        app.router.add_post(path, gw.handler(route))
    app.router.add_get("/metrics", gw.metrics_route)
    taken = set(GENERATION_ROUTES) | {"/metrics"}
    for path in FIRST_REPLICA_ROUTES:
        app.router.add_route("*", path, gw.forward_first)
        taken.add(path)
    for path in dict.fromkeys((*ENGINE_ROUTES, *passthrough_paths)):
        if path not in taken:
            app.router.add_route("*", path, gw.forward_every)
            taken.add(path)

    async def close_forwarder(app: web.Application) -> None:
        await forwarder.close()

    app.on_cleanup.append(close_forwarder)
    return app
