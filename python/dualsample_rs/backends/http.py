"""The HTTP side every backend shares: one server, httpx, retries, typed errors.

Transient failures (connection errors, timeouts, malformed bodies, 408/409/429/5xx) are
retried with exponential back-off and jitter, honouring Retry-After; other errors are
raised at once as typed exceptions. The timeout is a deadline for each whole request.
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
from typing import Any, TypeVar

import httpx
import numpy as np

from .._constants import (
    DEFAULT_CONNECTION_LIMITS,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    INITIAL_RETRY_DELAY,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
    RETRYABLE_STATUS,
)
from ..exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    InvalidInputError,
    InvalidResponseError,
    status_error,
)

log = logging.getLogger("dualsample_rs.client")
_B = TypeVar("_B", bound="HttpBackend")


@dataclass
class RequestStats:
    """Counts for one server: requests sent (each attempt), retries, calls that failed."""

    requests: int = 0
    retries: int = 0
    failures: int = 0


class HttpBackend:
    """The HTTP connection to one server, which each wire dialect builds on.

    Args:
        base_url: e.g. ``"http://localhost:8000"``.
        api_key: sent as ``Authorization: Bearer``.
        timeout: an ``httpx.Timeout`` or seconds.
        max_retries: retries after the first attempt for transient failures.
        retry_delay: the first back-off in seconds; it doubles with each retry, up to 8 s.
        http_client: an ``httpx.AsyncClient`` to use instead of creating one (e.g. with
            a custom transport); it is not closed by :meth:`aclose`.
        connection_pool_size: connections kept to the server.

    Attributes:
        model: the model name sent with requests (set by the handshake).
        stats: requests, retries and failures so far.
    """

    dialect = "http"

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
        self.model: str | None = None

    async def __aenter__(self: _B) -> _B:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    def with_options(self: _B, *, timeout: httpx.Timeout | float | None = None, max_retries: int | None = None) -> _B:
        """A client sharing this one's connections and counters, with other limits."""
        clone = object.__new__(type(self))
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

    # ------------------------------------------------------------ shared endpoints
    async def models(self) -> list[dict[str, Any]]:
        """The served models' cards (``/v1/models``, which vLLM and SGLang both answer)."""
        data = await self._request("GET", "/v1/models")
        return list(data.get("data", [])) if isinstance(data, dict) else []

    async def post_json(self, path: str, body: Any, probe: bool = False) -> Any:
        return await self._request("POST", path, body, probe=probe)


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
