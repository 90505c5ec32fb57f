"""One vLLM server over its OpenAI-compatible completions dialect (httpx, async).

Token ids in and out: prompts are sent as id lists with ``return_tokens_as_token_ids``
(text keys collide), and the top-k log probabilities of one step come back as arrays.
Transient failures (connection errors, timeouts, malformed bodies, 408/409/429/5xx) are
retried with exponential back-off and jitter, honouring Retry-After; other errors are
raised at once as typed exceptions.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from . import _core
from ._constants import (
    DEFAULT_CONNECTION_LIMITS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    INITIAL_RETRY_DELAY,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
    RETRYABLE_STATUS,
)
from .exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    InvalidInputError,
    InvalidResponseError,
    NotFoundError,
    status_error,
)

log = logging.getLogger("dualsample_rs.client")


@dataclass
class RequestStats:
    """Counts for one server: requests sent (each attempt), retries, calls that failed."""

    requests: int = 0
    retries: int = 0
    failures: int = 0


@dataclass
class TopK:
    """Each row's returned top-k: ids (int64, -1 padding) and raw log probabilities."""

    ids: np.ndarray
    logp: np.ndarray


class VLLMClient:
    """An async client for one vLLM (or compatible) server.

    Args:
        base_url: e.g. ``"http://localhost:8000"``.
        api_key: sent as ``Authorization: Bearer``.
        timeout: an ``httpx.Timeout`` or seconds.
        max_retries: retries after the first attempt for transient failures.
        retry_delay: the first back-off in seconds; it doubles with each retry, up to 8 s.
        http_client: an ``httpx.AsyncClient`` to use instead of creating one (e.g. with
            a custom transport); it is not closed by :meth:`aclose`.
        connection_pool_size: connections kept to the server.

    Example:
        >>> async with VLLMClient("http://localhost:8000") as c:  # doctest: +SKIP
        ...     ids = await c.tokenize("Hello")
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_delay: float = INITIAL_RETRY_DELAY,
        http_client: httpx.AsyncClient | None = None,
        connection_pool_size: int | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.max_retries = max_retries
        self.initial_retry_delay = retry_delay
        self.timeout = _timeout(timeout)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_http = http_client is None
        if http_client is None:
            limits = (
                httpx.Limits(max_connections=connection_pool_size, max_keepalive_connections=connection_pool_size)
                if connection_pool_size
                else DEFAULT_CONNECTION_LIMITS
            )
            http_client = httpx.AsyncClient(timeout=self.timeout, limits=limits)
        self._http = http_client
        self._headers = headers
        self.stats = RequestStats()

    async def __aenter__(self) -> VLLMClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def with_options(
        self, *, timeout: httpx.Timeout | float | None = None, max_retries: int | None = None
    ) -> VLLMClient:
        """A client sharing this one's connections and counters, with other limits."""
        clone = object.__new__(VLLMClient)
        clone.__dict__.update(self.__dict__)
        clone._owns_http = False
        if timeout is not None:
            clone.timeout = _timeout(timeout)
        if max_retries is not None:
            clone.max_retries = max_retries
        return clone

    # ------------------------------------------------------------ retry policy
    def should_retry(self, err: APIError) -> bool:
        if isinstance(err, (APIConnectionError, InvalidResponseError)):
            return True
        if isinstance(err, APIStatusError):
            return err.status_code in RETRYABLE_STATUS or err.status_code >= 500
        return False

    def retry_delay(self, attempt: int, response: httpx.Response | None) -> float:
        """Retry-After (ms or seconds or an HTTP date) when given and within the cap,
        else min(retry_delay·2^attempt, 8) s scaled by a jitter in [0.75, 1]."""
        after = parse_retry_after(response.headers) if response is not None else None
        if after is not None and 0 <= after <= MAX_RETRY_AFTER:
            return after
        return min(self.initial_retry_delay * 2**attempt, MAX_RETRY_DELAY) * (1 - 0.25 * random.random())

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content: bytes | None = None,
        probe: bool = False,
        decode: Callable[[bytes], Any] | None = None,
    ) -> Any:
        """Send with retries. `decode` turns a 2xx body into the result (default: JSON)
        and raises `InvalidResponseError` for a malformed one, which is retried like a
        transient fault. `probe`: an error answer is an expected outcome (not retried,
        not counted as a failure)."""
        url = self.base_url + path
        headers = dict(self._headers)
        if content is not None:
            headers["Content-Type"] = "application/json"
        for attempt in range(self.max_retries + 1):
            response: httpx.Response | None = None
            self.stats.requests += 1
            try:
                # httpx bounds each read, so a body that trickles in would never time out:
                # the read timeout is also a deadline for the whole request.
                response = await asyncio.wait_for(
                    self._http.request(method, url, json=body, content=content, headers=headers, timeout=self.timeout),
                    self.timeout.read,
                )
            except (httpx.TimeoutException, asyncio.TimeoutError) as exc:
                err: APIError = APITimeoutError(f"timed out: {method} {url}", getattr(exc, "_request", None))
                cause: BaseException = exc
            except httpx.RequestError as exc:  # transport errors, bad encodings, redirect loops
                err = APIConnectionError(f"connection error: {method} {url}: {exc!r}", getattr(exc, "_request", None))
                cause = exc
            else:
                if 200 <= response.status_code < 300:
                    try:
                        return decode(response.content) if decode else _json_body(response.content)
                    except InvalidResponseError as exc:
                        err, cause = exc, exc
                else:
                    try:
                        data = _json_body(response.content)
                    except InvalidResponseError:
                        data = None
                    err = status_error(response, data)
                    cause = err
            if probe and isinstance(err, APIStatusError) and not self.should_retry(err):
                raise err
            if attempt < self.max_retries and self.should_retry(err):
                delay = self.retry_delay(attempt, response)
                log.debug("retrying %s %s in %.2fs after %s", method, path, delay, err)
                self.stats.retries += 1
                await asyncio.sleep(delay)
                continue
            self.stats.failures += 1
            raise err from cause
        raise AssertionError("unreachable")

    # ------------------------------------------------------------ endpoints
    async def models(self) -> list[dict[str, Any]]:
        data = await self._request("GET", "/v1/models")
        return list(data.get("data", [])) if isinstance(data, dict) else []

    async def tokenize(
        self,
        prompt: str | None = None,
        *,
        messages: list[dict[str, str]] | None = None,
        add_special_tokens: bool = True,
    ) -> list[int]:
        body: dict[str, Any] = {"add_special_tokens": add_special_tokens}
        if messages is not None:
            body["messages"] = messages
            body["add_generation_prompt"] = True
        else:
            body["prompt"] = prompt
        data = await self._request("POST", "/tokenize", body)
        return [int(t) for t in data["tokens"]]

    async def detokenize(self, ids: list[int]) -> str:
        data = await self._request("POST", "/detokenize", {"tokens": ids})
        return str(data["prompt"])

    async def tokenizer_info(self) -> dict[str, Any] | None:
        """The tokenizer's settings, or None where the endpoint is not enabled."""
        try:
            data = await self._request("GET", "/tokenizer_info", probe=True)
        except NotFoundError:
            return None
        except APIStatusError as err:
            if err.status_code in (404, 405, 501):
                return None
            raise
        return data if isinstance(data, dict) else None

    async def step(self, open_contexts: list[str], top_k: int, model: str | None) -> TopK:
        """The top-k next-token log probabilities for each context.

        Each context is its ids as JSON text without the closing bracket (``"[1,2,3"``):
        the form a growing context is kept in, so building the request is one join
        (closing each one first would copy every context once more per step).
        """
        head: dict[str, Any] = {
            "max_tokens": 1,
            "logprobs": top_k,
            "temperature": 0,
            "return_tokens_as_token_ids": True,
        }
        if model:
            head["model"] = model
        content = (json.dumps(head)[:-1] + ',"prompt":[' + "],".join(open_contexts) + "]]}").encode()
        t0 = time.perf_counter()
        rows = len(open_contexts)
        top = await self._request(
            "POST", "/v1/completions", content=content, decode=lambda raw: parse_topk(raw, rows, top_k)
        )
        log.debug("step of %d rows in %.1f ms", rows, 1e3 * (time.perf_counter() - t0))
        return top


def _timeout(value: httpx.Timeout | float) -> httpx.Timeout:
    t = value if isinstance(value, httpx.Timeout) else httpx.Timeout(value, connect=min(5.0, value))
    if t.read is None:
        raise InvalidInputError("timeout: a read timeout is needed (it is also the deadline of each request)")
    return t


def parse_retry_after(headers: httpx.Headers) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            return value if np.isfinite(value) else None
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if np.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def _json_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidResponseError(f"malformed JSON body: {exc}") from exc


def parse_topk(raw: bytes, rows: int, top_k: int) -> TopK:
    """Arrays from a completions reply with token-id keys (parsed in Rust, without
    building Python objects); raises InvalidResponseError unless the reply has one
    choice per row, each with a top-logprobs object keyed ``"token_id:N"``."""
    try:
        ids, logp = _core.parse_topk(raw, rows, top_k)
    except InvalidInputError as exc:
        raise InvalidResponseError(f"unexpected completions reply: {exc}") from exc
    return TopK(ids, logp)
