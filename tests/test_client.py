"""The HTTP client's retry policy and parsing, through an in-process mock transport."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import numpy as np
import pytest
from aiohttp import web
from dualsample_rs import VLLMClient
from dualsample_rs.backends import TokenizerFacts
from dualsample_rs.backends.http import parse_retry_after
from dualsample_rs.backends.vllm_completions import parse_topk
from dualsample_rs.exceptions import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    InvalidResponseError,
    LogprobsLimitError,
    NotFoundError,
    RateLimitError,
    Response,
    ServiceUnavailableError,
)


class Scripted:
    """An in-process aiohttp server that answers each request with the next step of a
    script, then with `final`: a (status, body, headers) triple, or "drop" (close the
    connection without answering), "cut" (close it mid-body) or "stall" (answer late)."""

    def __init__(self, steps: list, final: tuple = (200, {"tokens": [1, 2], "count": 2}, {})) -> None:
        self.steps, self.final, self.calls = list(steps), final, 0
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.calls += 1
        step = self.steps.pop(0) if self.steps else self.final
        if step == "drop":
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if step == "cut":
            stream = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            stream.content_length = 100
            await stream.prepare(request)
            await stream.write(b'{"tokens": [1')
            assert request.transport is not None
            request.transport.close()
            return stream
        if step == "chunked":  # no Content-Length: the body comes in chunks
            stream = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            stream.enable_chunked_encoding()
            await stream.prepare(request)
            for piece in (b'{"tokens": ', b"[1, ", b"2], ", b'"count": 2}'):
                await stream.write(piece)
            await stream.write_eof()
            return stream
        if step == "not http":  # a reply that is not HTTP at all
            assert request.transport is not None
            request.transport.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            request.transport.close()
            return web.Response()
        if step == "stall":
            await asyncio.sleep(2)
            step = self.final
        status, body, headers = step
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return web.Response(status=status, body=data, headers=headers, content_type="application/json")

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def run_client(steps: list, call, max_retries: int = 3, timeout: float = 5.0, **final) -> tuple[object, Scripted, list]:
    """Run `call(client)` against a scripted server, without waiting between retries;
    returns (result or raised exception, server, the back-offs the client chose)."""
    server = Scripted(steps, **final)
    delays: list[float] = []

    async def go() -> object:
        async with server as url:
            c = VLLMClient(url, max_retries=max_retries, timeout=timeout)

            def no_wait(attempt: int, response) -> float:
                delays.append(VLLMClient.retry_delay(c, attempt, response))
                return 0.0

            c.retry_delay = no_wait  # type: ignore[method-assign]
            try:
                return await call(c)
            except Exception as err:
                return err
            finally:
                await c.aclose()
                run_client.last = c  # type: ignore[attr-defined]

    return asyncio.run(go()), server, delays


def tokenize(c: VLLMClient):
    return c.tokenize("x")


@pytest.mark.parametrize(
    "failure",
    [
        (500, {"error": {"message": "boom"}}, {}),
        (503, b"", {"Retry-After": "1"}),
        (429, b"", {}),
        (408, b"", {}),
        (200, b'{"tokens": [1', {}),
        "drop",
        "cut",
        "not http",
    ],
)
def test_transient_failures_are_retried(failure: object) -> None:
    got, server, _ = run_client([failure, failure], tokenize)
    c = run_client.last  # type: ignore[attr-defined]
    assert got == [1, 2]
    assert server.calls == 3 and c.stats.retries == 2 and c.stats.failures == 0 and c.stats.requests == 3


@pytest.mark.parametrize(
    "failure,exc",
    [
        ((500, b"", {}), InternalServerError),
        ((503, b"", {}), ServiceUnavailableError),
        ((429, b"", {}), RateLimitError),
        ((200, b"not json", {}), InvalidResponseError),
        ("drop", APIConnectionError),
    ],
)
def test_retries_run_out(failure: object, exc: type) -> None:
    got, server, _ = run_client([failure] * 10, tokenize, max_retries=2)
    assert isinstance(got, exc), got
    assert server.calls == 3 and run_client.last.stats.failures == 1  # type: ignore[attr-defined]


def test_timeouts_and_refused_connections() -> None:
    got, server, _ = run_client(["stall"] * 3, tokenize, max_retries=1, timeout=0.3)
    assert isinstance(got, APITimeoutError) and server.calls == 2

    async def refused() -> object:
        c = VLLMClient("http://127.0.0.1:9", max_retries=1, retry_delay=0.0)
        try:
            return await c.tokenize("x")
        except Exception as err:
            return err
        finally:
            await c.aclose()

    got = asyncio.run(refused())
    assert isinstance(got, APIConnectionError) and not isinstance(got, APITimeoutError)


@pytest.mark.parametrize(
    "status,exc",
    [(400, BadRequestError), (401, AuthenticationError), (404, NotFoundError), (422, None)],
)
def test_client_errors_are_not_retried(status: int, exc: type | None) -> None:
    body = {
        "error": {"message": "Requested sample logprobs of 25, which is greater than max allowed: 20", "code": status}
    }
    got, server, _ = run_client([(status, body, {})] * 5, tokenize)
    assert isinstance(got, exc or APIStatusError) and server.calls == 1
    assert got.status_code == status and "max allowed: 20" in str(got)  # type: ignore[attr-defined]


def test_old_flat_error_bodies_are_read() -> None:
    body = {"object": "error", "message": "This model's maximum context length is 2048 tokens.", "code": 400}
    got, _, _ = run_client([(400, body, {})], tokenize)
    assert isinstance(got, BadRequestError) and "maximum context length" in str(got)


def _reply(headers: dict) -> Response:
    return Response(503, headers, b"", "POST", "http://server/x")


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    c = VLLMClient("http://server")
    for attempt, cap in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0]):
        for _ in range(20):
            assert 0.75 * cap <= c.retry_delay(attempt, None) <= cap
    assert c.retry_delay(0, _reply({"Retry-After": "3"})) == 3.0
    assert c.retry_delay(0, _reply({"retry-after-ms": "250"})) == 0.25
    assert c.retry_delay(0, _reply({"Retry-After": "100000"})) <= 0.5  # over the cap: back-off


@pytest.mark.parametrize(
    "headers,expected",
    [
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"Retry-After": "inf"}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict, expected: float | None) -> None:
    assert parse_retry_after(headers) == expected


def test_parse_retry_after_dates() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after({"Retry-After": when}) <= 31  # type: ignore[operator]
    assert parse_retry_after({"Retry-After": "-5"}) == -5.0
    c = VLLMClient("http://server")
    # a negative or past Retry-After is not honoured: the back-off is used
    assert 0.375 <= c.retry_delay(1, _reply({"Retry-After": "-5"})) <= 1.0


def test_parse_topk() -> None:
    body = {"choices": [
        {"index": 1, "logprobs": {"top_logprobs": [{"token_id:5": -0.1, "token_id:7": -9999.0}]}},
        {"index": 0, "logprobs": {"top_logprobs": [{"token_id:3": -0.5, "token_id:4": -1.5, "token_id:9": -2.0}]}},
    ]}  # fmt: skip
    top = parse_topk(json.dumps(body).encode(), 2, 3)
    np.testing.assert_array_equal(top.ids, [[3, 4, 9], [5, 7, -1]])
    assert top.logp[1, 1] == -np.inf and top.logp[1, 2] == -np.inf and top.logp[0, 2] == -2.0
    with pytest.raises(InvalidResponseError, match="expected 3 choices"):
        parse_topk(json.dumps(body).encode(), 3, 3)
    text_keys = {"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"a": -0.1}]}}]}
    with pytest.raises(InvalidResponseError, match="is not a token id"):
        parse_topk(json.dumps(text_keys).encode(), 1, 1)
    with pytest.raises(InvalidResponseError):
        parse_topk(b'{"nope": 1}', 1, 1)
    with pytest.raises(InvalidResponseError):
        parse_topk(b'{"choices": [{"index": 0, "logprobs": {"top_logprobs": [{"token_id:1"', 1, 1)


def test_with_options_shares_connections_and_counters() -> None:
    async def call(c: VLLMClient) -> object:
        strict = c.with_options(max_retries=0)
        with pytest.raises(InternalServerError):
            await strict.tokenize("x")
        await strict.aclose()  # a clone leaves the shared connections open
        return await c.tokenize("x")

    got, server, _ = run_client([(500, b"", {})] * 2, call, max_retries=5)
    c = run_client.last  # type: ignore[attr-defined]
    assert got == [1, 2] and server.calls == 3 and c.max_retries == 5 and c.stats.requests == 3


def test_probes_retry_transient_failures_but_not_missing_endpoints() -> None:
    info = (200, {"eos_token": "</s>"}, {})
    got, server, _ = run_client([(503, b"", {}), (502, b"", {})], lambda c: c.tokenizer_info(), final=info)
    assert got == TokenizerFacts(eos_token="</s>") and server.calls == 3
    got, server, _ = run_client([(404, b"", {})] * 3, lambda c: c.tokenizer_info(), final=info)
    assert got is None and server.calls == 1 and run_client.last.stats.failures == 0  # type: ignore[attr-defined]


def test_the_timeout_is_a_deadline_for_a_trickling_body() -> None:
    from dualsample_rs.server import running_server

    # The server trickles its body out in 8 pieces over 4 s, each well inside the timeout.
    with running_server("base", slow_body_rate=1.0, slow_body_seconds=4.0) as url:

        async def go() -> float:
            async with VLLMClient(url, timeout=1.5, max_retries=0) as c:
                t0 = time.monotonic()
                with pytest.raises(APITimeoutError, match="timed out"):
                    await c.tokenize("Hello")
                return time.monotonic() - t0

        assert asyncio.run(go()) < 3.5


def test_chunked_bodies_are_read_whole() -> None:
    got, server, _ = run_client(["chunked"], tokenize)
    assert got == [1, 2] and server.calls == 1


@pytest.mark.parametrize(
    "route,model_info,dialect",
    [
        ("/model_info", 200, "sglang"),
        ("/get_model_info", 200, "sglang"),  # SGLang before /model_info
        ("/model_info", 404, "vllm-completions"),
    ],
)
def test_dialect_detection_falls_back_to_sglang_discovery(route: str, model_info: int, dialect: str) -> None:
    from dualsample_rs.backends import HttpBackend, detect_dialect

    asked: list[str] = []

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": [{"id": "m"}]})  # no owned_by

    async def info(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({}, status=model_info)

    async def go() -> str:
        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_get(route, info)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        try:
            async with HttpBackend(f"http://127.0.0.1:{runner.addresses[0][1]}", max_retries=0) as http:
                return await detect_dialect(http)
        finally:
            await runner.cleanup()

    assert asyncio.run(go()) == dialect
    # the deprecated route is asked only where the current one is missing
    assert asked[0] == route and (route == "/model_info" or "/model_info" not in asked)


@pytest.mark.parametrize(
    "cls,body,status,exc,shown",
    [
        # vLLM since 0.10.1, its logprobs cap named by `param` or by the message
        (
            "vllm",
            {
                "error": {
                    "message": "Requested sample logprobs of 25, which is greater than max allowed: 20",
                    "param": "logprobs",
                    "code": 400,
                }
            },
            400,
            LogprobsLimitError,
            "Requested sample logprobs of 25, which is greater than max allowed: 20",
        ),
        (
            "vllm",
            {"object": "error", "message": "Requested prompt logprobs of 9, which is greater than max allowed: 5"},
            400,
            LogprobsLimitError,
            "Requested prompt logprobs of 9, which is greater than max allowed: 5",
        ),
        (
            "vllm",
            {"error": {"message": "logprob_token_ids requires logprobs to be set.", "param": "logprob_token_ids"}},
            400,
            BadRequestError,
            "logprob_token_ids requires logprobs to be set.",
        ),
        ("vllm", {"error": "Unauthorized"}, 401, AuthenticationError, "Unauthorized"),
        (
            "sglang",
            {"object": "error", "message": "input_ids must be a non-empty list", "code": 400},
            400,
            BadRequestError,
            "input_ids must be a non-empty list",
        ),
        (
            "sglang",
            {"error": {"message": "Requested logprobs of 30"}},
            400,
            BadRequestError,
            "Requested logprobs of 30",
        ),
        ("http", {"error": {"message": "not read"}}, 400, BadRequestError, ""),
    ],
)
def test_each_dialect_reads_its_engines_error_bodies(cls: str, body: dict, status: int, exc: type, shown: str) -> None:
    from dualsample_rs.backends import HttpBackend, SGLangBackend

    client_class = {"vllm": VLLMClient, "sglang": SGLangBackend, "http": HttpBackend}[cls]

    async def go() -> Exception:
        async with Scripted([(status, body, {})]) as url, client_class(url, max_retries=0) as c:
            with pytest.raises(APIStatusError) as caught:
                await c.get_json("/anything")
            return caught.value

    got = asyncio.run(go())
    assert type(got) is exc and got.status_code == status  # type: ignore[attr-defined]
    assert str(got).endswith(f"/anything: {shown}" if shown else "/anything")


def test_tokenizer_facts_and_model_cards_are_read_from_their_wire_shapes() -> None:
    from dualsample_rs.backends import ModelCard, TokenizerFacts
    from dualsample_rs.backends.http import model_card
    from dualsample_rs.backends.vllm_completions import tokenizer_facts

    info = {
        "tokenizer_class": "X",
        "eos_token": "</s>",
        "bos_token": {"content": "<s>"},  # not a string: not read
        "model_max_length": 4096,
        "added_tokens_decoder": {"2": {"content": "</s>", "special": True}, "7": {"content": "x", "special": False}},
    }
    assert tokenizer_facts(info) == TokenizerFacts("</s>", None, 4096, {"</s>": 2})
    assert model_card({"id": "m", "owned_by": "vllm", "max_model_len": 2048}) == ModelCard("m", 2048, "vllm")
    assert model_card({"id": "m"}) == ModelCard("m") and model_card({"object": "model"}) is None
