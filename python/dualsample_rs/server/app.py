"""The HTTP layer of the reference server (aiohttp): routes, auth, queue limit, faults.

Two flavors share the models: ``vllm`` (OpenAI-compatible routes, and with
``enable_scale_out`` the tokens-in/out ``/inference/v1/generate``) and ``sglang`` (the
native ``/generate`` and SGLang's discovery routes, error bodies and tokenizer shapes).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from aiohttp import web
from aiohttp.typedefs import Handler

from .._core import __version__
from ..exceptions import InvalidInputError
from . import completions as completion_api
from . import generate_api
from .errors import APIError, bad_request, load_json, valid_text
from .faults import NO_FAULT, Fault, FaultConfig
from .model import Model
from .prefix_cache import PrefixCache
from .sglang_api import GenerateCall

log = logging.getLogger("dualsample_rs.server")
_T = TypeVar("_T")

# Paths that answer without an API key and never misbehave on purpose.
OPEN_PATHS = {"/health", "/version", "/health_generate"}
PROMPT_KEY_IDS = 24


@dataclass
class ServerOptions:
    max_logprobs: int = 20
    api_key: str | None = None
    max_num_queued_reqs: int | None = None
    enable_tokenizer_info: bool = False
    flavor: str = "vllm"
    enable_scale_out: bool = False
    enable_prompt_tokens_details: bool = False
    enable_trace_replay: bool = False
    faults: FaultConfig = field(default_factory=FaultConfig)
    #: seconds per position computed, positions of all requests one after another
    latency_per_position: float = 0.0


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type="application/json", headers=headers)


async def _read_json(request: web.Request) -> Any:
    try:
        return load_json(await request.read())
    except ValueError as err:
        raise APIError(400, str(err), "Bad Request") from None


class Server:
    def __init__(self, model: Model, options: ServerOptions) -> None:
        if options.latency_per_position < 0:
            raise InvalidInputError(f"latency_per_position: must be >= 0, got {options.latency_per_position}")
        busy = _Busy(model, options.latency_per_position) if options.latency_per_position else None
        self.model: Model = model if busy is None else cast(Model, busy)
        self.options = options
        self.in_flight = 0
        self.created = int(time.time())
        # Set on shutdown: generation running in worker threads stops at its next step.
        self.stopping = threading.Event()
        # Generation requests per prompt, keyed by the prompt's first ids: lets a test see
        # which server each sequence's steps went to (GET /dualsample/prompts).
        self.prompt_counts: collections.Counter[str] = collections.Counter()
        # Requests by path (GET /dualsample/requests): lets a test or bench see how many
        # requests of each kind a run sent, e.g. per record.
        self.request_counts: collections.Counter[str] = collections.Counter()
        self.prefix_cache = PrefixCache()

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._count, self._errors, self._auth, self._faults], client_max_size=64 * 1024**2
        )
        add = app.router
        add.add_post("/tokenize", self.tokenize)
        add.add_post("/detokenize", self.detokenize)
        add.add_get("/v1/models", self.models)
        add.add_get("/health", self.health)
        add.add_get("/dualsample/prompts", self.prompts)
        add.add_get("/dualsample/requests", self.requests)
        if self.options.flavor == "sglang":
            add.add_post("/generate", self.sglang_generate)
            add.add_get("/health_generate", self.health)
            add.add_get("/get_model_info", self.model_info)
            add.add_get("/model_info", self.model_info)
            add.add_get("/server_info", self.server_info)
        else:
            add.add_post("/v1/completions", self.completions)
            add.add_get("/version", self.version)
            add.add_get("/tokenizer_info", self.tokenizer_info)
            if self.options.enable_scale_out:
                add.add_post(generate_api.PATH, self.vllm_generate)
        return app

    def _error(self, err: APIError, headers: dict[str, str] | None = None) -> web.Response:
        return _json(err.body(self.options.flavor), status=err.status, headers=headers)

    # ------------------------------------------------------------ middlewares
    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/dualsample/"):
            self.request_counts[request.path] += 1
        return await handler(request)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as err:
            return self._error(err)
        except completion_api.Stopped:
            return self._error(APIError(503, "The server is shutting down.", "ServiceUnavailableError"))
        except web.HTTPException as err:  # unknown route, wrong method, body too large: JSON too
            if err.status < 400:
                raise
            return self._error(APIError(err.status, err.reason, type(err).__name__.removeprefix("HTTP") + "Error"))

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = self.options.api_key
        if key and request.path not in OPEN_PATHS and request.headers.get("Authorization") != f"Bearer {key}":
            return _json({"error": "Unauthorized"}, status=401)
        return await handler(request)

    @web.middleware
    async def _faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        faults = self.options.faults
        fault: Fault = faults.draw() if faults.active and request.path not in OPEN_PATHS else NO_FAULT
        if fault.delay:
            await asyncio.sleep(fault.delay)
        if fault.kind == "500":
            return self._error(APIError(500, "Injected fault: internal server error", "InternalServerError"))
        if fault.kind == "503":
            err = APIError(503, "Injected fault: service unavailable", "ServiceUnavailableError")
            return self._error(err, headers={"Retry-After": f"{faults.retry_after:g}"})
        response = await handler(request)
        if fault.kind is None and not fault.slow_body:
            return response
        # the routes answer JSON bytes (`_json`), never a streamed payload
        assert isinstance(response, web.Response) and isinstance(response.body, (bytes, bytearray))
        payload = bytes(response.body)
        if fault.kind == "malformed":
            return web.Response(body=payload[: max(1, len(payload) // 2)], status=200, content_type="application/json")
        stream = web.StreamResponse(status=response.status, headers={"Content-Type": "application/json"})
        stream.content_length = len(payload)
        await stream.prepare(request)
        if fault.kind == "drop":
            await stream.write(payload[: len(payload) // 2])
            assert request.transport is not None
            request.transport.close()  # the client sees the connection end mid-body
            return stream
        chunks = 8
        step = max(1, -(-len(payload) // chunks))
        for i in range(0, len(payload), step):
            await stream.write(payload[i : i + step])
            await asyncio.sleep(faults.slow_body_seconds / chunks)
        await stream.write_eof()
        return stream

    # ------------------------------------------------------------ routes
    async def _run(self, work: Callable[[], _T]) -> _T:
        """Run generation work off the event loop (it is CPU work), so health checks still
        answer, within the queue limit."""
        limit = self.options.max_num_queued_reqs
        if limit is not None and self.in_flight >= limit:
            raise APIError(
                503, "The engine is currently busy and cannot accept new requests.", "ServiceUnavailableError"
            )
        self.in_flight += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(None, work)
        finally:
            self.in_flight -= 1

    def _admit(self, req: completion_api.Request) -> None:
        """Count the request's prompts and look them up in the prefix cache."""
        for p in req.prompts:
            self.prompt_counts[",".join(map(str, p[:PROMPT_KEY_IDS]))] += 1
        req.cached_tokens = [self.prefix_cache.use(p) for p in req.prompts]
        req.report_cached = self.options.enable_prompt_tokens_details

    async def prompts(self, request: web.Request) -> web.Response:
        return _json(dict(self.prompt_counts))

    async def requests(self, request: web.Request) -> web.Response:
        return _json(dict(self.request_counts))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        req = completion_api.parse(await _read_json(request), self.model, self.options.max_logprobs)
        req.request_id = request.headers.get("X-Request-Id")
        self._admit(req)
        if req.stream:

            def chunks_of() -> list[dict[str, Any]]:
                seqs = completion_api.generate(req, self.model, self.stopping)
                return completion_api.stream_chunks(req, self.model, seqs)

            chunks = await self._run(chunks_of)
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await stream.prepare(request)
            for c in chunks:
                await stream.write(b"data: " + json.dumps(c).encode() + b"\n\n")
            await stream.write(b"data: [DONE]\n\n")
            await stream.write_eof()
            return stream

        def work() -> dict[str, Any]:
            return completion_api.respond(req, self.model, completion_api.generate(req, self.model, self.stopping))

        return _json(await self._run(work))

    async def vllm_generate(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        req = generate_api.parse(body, self.model, self.options.max_logprobs, self.options.enable_trace_replay)
        if "X-Request-Id" in request.headers:  # as vLLM: the header's id wins over the body's
            req.request_id = f"generate-tokens-{request.headers['X-Request-Id']}"
        self._admit(req)
        want_ids = bool(isinstance(body, dict) and body.get("return_token_ids"))

        def work() -> dict[str, Any]:
            seq = completion_api.generate(req, self.model, self.stopping)[0]
            return generate_api.respond(req, self.model, seq, want_ids)

        return _json(await self._run(work))

    async def sglang_generate(self, request: web.Request) -> web.Response:
        call = GenerateCall(await _read_json(request), self.model)
        self._admit(call.request)
        return _json(
            await self._run(
                lambda: call.respond(self.model, completion_api.generate(call.request, self.model, self.stopping))
            )
        )

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        if not isinstance(body, dict):
            raise bad_request("request body must be an object")
        sglang = self.options.flavor == "sglang"
        if "messages" in body:
            # Both engines render the chat template; neither adds special tokens to it by
            # default (the template holds them), as vLLM's chat default and SGLang's say.
            messages = body["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise bad_request("messages must be a list of objects", "messages")
            for i, m in enumerate(messages):
                for key in ("role", "content"):
                    if not isinstance(m.get(key), str):
                        raise bad_request(f"messages[{i}].{key}: Field required (a string)", "messages")
                    valid_text(m[key], "messages")
            text = self.model.apply_chat_template(messages, bool(body.get("add_generation_prompt", True)))
            ids: Any = self.model.tokenize(text, bool(body.get("add_special_tokens", False)))
            count: Any = len(ids)
        elif sglang:
            prompt = body.get("prompt")
            if not isinstance(prompt, (str, list)):
                raise bad_request(f"Invalid prompt type: {type(prompt)}. Expected str or List[str].")
            add = bool(body.get("add_special_tokens", True))
            if isinstance(prompt, str):
                ids = self.model.tokenize(valid_text(prompt, "prompt"), add)
                count = len(ids)
            else:
                ids = [self.model.tokenize(valid_text(str(p), "prompt"), add) for p in prompt]
                count = [len(i) for i in ids]
        elif isinstance(body.get("prompt"), str):
            ids = self.model.tokenize(valid_text(body["prompt"], "prompt"), bool(body.get("add_special_tokens", True)))
            count = len(ids)
        else:
            raise bad_request("prompt (a string) or messages is required", "prompt")
        if sglang:
            return _json({"tokens": ids, "count": count, "max_model_len": self.model.max_model_len})
        strs = [self.model.token_text(t) for t in ids] if body.get("return_token_strs") else None
        return _json({"count": count, "max_model_len": self.model.max_model_len, "tokens": ids, "token_strs": strs})

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await _read_json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            raise bad_request("tokens must be a list of integers", "tokens")
        for t in tokens:
            if not 0 <= t < self.model.vocab_size:
                raise bad_request(f"Token id {t} is out of vocabulary", "tokens")
        if self.options.flavor == "sglang":
            return _json({"text": self.model.detokenize(tokens, bool(body.get("skip_special_tokens", True)))})
        return _json({"prompt": self.model.detokenize(tokens)})

    async def models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model.name,
            "object": "model",
            "created": self.created,
            "owned_by": self.options.flavor,
            "root": self.model.name,
            "parent": None,
            "max_model_len": self.model.max_model_len,
            "permission": [],
        }
        return _json({"object": "list", "data": [card]})

    async def model_info(self, request: web.Request) -> web.Response:
        return _json({"model_path": self.model.name, "tokenizer_path": self.model.name, "is_generation": True,
                      "preferred_sampling_params": None, "weight_version": "default"})  # fmt: skip

    async def server_info(self, request: web.Request) -> web.Response:
        return _json(
            {"model_path": self.model.name, "context_length": self.model.max_model_len, "version": __version__}
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": __version__})

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        if not self.options.enable_tokenizer_info:
            raise APIError(404, "Not Found", "NotFoundError")
        return _json(
            {
                "tokenizer_class": "ByteTokenizer",
                "eos_token": self.model.eos_token,
                "model_max_length": self.model.max_model_len,
                "added_tokens_decoder": {
                    str(i): {"content": s, "special": True}
                    for s, i in sorted(getattr(self.model, "special_tokens", {}).items(), key=lambda kv: kv[1])
                },
            }
        )


async def serve(model: Model, options: ServerOptions, host: str, port: int, ready: Any = None) -> None:
    """Serve until cancelled; `ready(url)` is called once the socket listens."""
    server = Server(model, options)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port
    if ready is not None:
        ready(f"http://{host}:{bound}")
    try:
        await asyncio.Event().wait()
    finally:
        server.stopping.set()
        await runner.cleanup()


class _Busy:
    """A model that holds one lock for `seconds` per position it computes, so positions
    cost time one after another across requests, as on a compute-bound engine (the
    generation work runs in worker threads, so the wait holds no other request back but
    through the lock)."""

    def __init__(self, model: Model, seconds: float) -> None:
        self._model, self._seconds = model, seconds
        self._lock = threading.Lock()

    def next_logprobs(self, contexts: list[list[int]]) -> Any:
        with self._lock:
            time.sleep(self._seconds * len(contexts))
        return self._model.next_logprobs(contexts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
