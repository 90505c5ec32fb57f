"""The HTTP client's retry policy and parsing, through an in-process mock transport."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time

import httpx
import numpy as np
import pytest
from dualsample_rs import VLLMClient
from dualsample_rs.backends.http import parse_retry_after
from dualsample_rs.backends.vllm_completions import parse_topk
from dualsample_rs.exceptions import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    InvalidResponseError,
    NotFoundError,
    RateLimitError,
    ServiceUnavailableError,
)


def client_for(handler, max_retries: int = 3) -> tuple[VLLMClient, list[float]]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    c = VLLMClient("http://server", http_client=http, max_retries=max_retries)
    delays: list[float] = []

    def no_wait(attempt: int, response: httpx.Response | None) -> float:
        delays.append(VLLMClient.retry_delay(c, attempt, response))
        return 0.0

    c.retry_delay = no_wait  # type: ignore[method-assign]
    return c, delays


def flaky(failures: list, final: httpx.Response):
    calls = {"n": 0}

    def handler(request: httpx.Request) -> httpx.Response:
        calls["n"] += 1
        if failures:
            f = failures.pop(0)
            if isinstance(f, Exception):
                raise f
            return f
        return final

    return handler, calls


OK = httpx.Response(200, json={"tokens": [1, 2], "count": 2})


@pytest.mark.parametrize(
    "failure",
    [
        httpx.Response(500, json={"error": {"message": "boom"}}),
        httpx.Response(503, headers={"Retry-After": "1"}),
        httpx.Response(429),
        httpx.Response(408),
        httpx.Response(200, content=b'{"tokens": [1'),
        httpx.ConnectError("refused"),
        httpx.ReadTimeout("slow"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message body"),
    ],
)
def test_transient_failures_are_retried(failure: object) -> None:
    handler, calls = flaky([failure, failure], OK)
    c, _ = client_for(handler)
    assert asyncio.run(c.tokenize("x")) == [1, 2]
    assert calls["n"] == 3 and c.stats.retries == 2 and c.stats.failures == 0 and c.stats.requests == 3


@pytest.mark.parametrize(
    "failure,exc",
    [
        (httpx.Response(500), InternalServerError),
        (httpx.Response(503), ServiceUnavailableError),
        (httpx.Response(429), RateLimitError),
        (httpx.Response(200, content=b"not json"), InvalidResponseError),
        (httpx.ConnectError("refused"), APIConnectionError),
        (httpx.ReadTimeout("slow"), APITimeoutError),
    ],
)
def test_retries_run_out(failure: object, exc: type) -> None:
    handler, calls = flaky([failure] * 10, OK)
    c, _ = client_for(handler, max_retries=2)
    with pytest.raises(exc):
        asyncio.run(c.tokenize("x"))
    assert calls["n"] == 3 and c.stats.failures == 1


@pytest.mark.parametrize(
    "status,exc",
    [(400, BadRequestError), (401, AuthenticationError), (404, NotFoundError), (422, None)],
)
def test_client_errors_are_not_retried(status: int, exc: type | None) -> None:
    body = {
        "error": {"message": "Requested sample logprobs of 25, which is greater than max allowed: 20", "code": status}
    }
    handler, calls = flaky([httpx.Response(status, json=body)] * 5, OK)
    c, _ = client_for(handler)
    with pytest.raises(exc or Exception) as info:
        asyncio.run(c.tokenize("x"))
    assert calls["n"] == 1
    assert info.value.status_code == status and "max allowed: 20" in str(info.value)


def test_old_flat_error_bodies_are_read() -> None:
    body = {"object": "error", "message": "This model's maximum context length is 2048 tokens.", "code": 400}
    handler, _ = flaky([httpx.Response(400, json=body)], OK)
    c, _ = client_for(handler)
    with pytest.raises(BadRequestError, match="maximum context length"):
        asyncio.run(c.tokenize("x"))


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    c = VLLMClient("http://server")
    for attempt, cap in enumerate([0.5, 1.0, 2.0, 4.0, 8.0, 8.0]):
        for _ in range(20):
            assert 0.75 * cap <= c.retry_delay(attempt, None) <= cap
    assert c.retry_delay(0, httpx.Response(503, headers={"Retry-After": "3"})) == 3.0
    assert c.retry_delay(0, httpx.Response(503, headers={"retry-after-ms": "250"})) == 0.25
    assert c.retry_delay(0, httpx.Response(503, headers={"Retry-After": "100000"})) <= 0.5  # over the cap: back-off
    asyncio.run(c.aclose())


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
    assert parse_retry_after(httpx.Headers(headers)) == expected


def test_parse_retry_after_dates() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after(httpx.Headers({"Retry-After": when})) <= 31  # type: ignore[operator]
    assert parse_retry_after(httpx.Headers({"Retry-After": "-5"})) == -5.0
    c = VLLMClient("http://server")
    # a negative or past Retry-After is not honoured: the back-off is used
    assert 0.375 <= c.retry_delay(1, httpx.Response(503, headers={"Retry-After": "-5"})) <= 1.0
    asyncio.run(c.aclose())


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
    handler, calls = flaky([httpx.Response(500)] * 3, OK)
    c, _ = client_for(handler, max_retries=5)
    strict = c.with_options(max_retries=0)
    with pytest.raises(InternalServerError):
        asyncio.run(strict.tokenize("x"))
    assert calls["n"] == 1 and c.max_retries == 5


def test_probes_retry_transient_failures_but_not_missing_endpoints() -> None:
    info = httpx.Response(200, json={"eos_token": "</s>"})
    handler, calls = flaky([httpx.Response(503), httpx.Response(502)], info)
    c, _ = client_for(handler)
    assert asyncio.run(c.tokenizer_info()) == {"eos_token": "</s>"} and calls["n"] == 3
    handler, calls = flaky([httpx.Response(404)] * 3, info)
    c, _ = client_for(handler)
    assert asyncio.run(c.tokenizer_info()) is None and calls["n"] == 1 and c.stats.failures == 0


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
