"""The HTTP side every backend shares: one server, retries, typed errors.

Transient failures (connection errors, timeouts, torn or malformed bodies, replies to
another request, 408/409/429/5xx) are retried with exponential back-off and jitter,
honouring Retry-After; other errors are raised at once as typed exceptions. The timeout
is a deadline for each whole request. Requests go through `transport.Transport` (plain
http on llhttp, TLS and proxies on aiohttp); every request carries an id of its own,
which the dialects ask the server to echo so that a reply is checked against its
request before it is used.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import random
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, TypeVar, overload

from ..exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    CertificateError,
    IncompleteReplyError,
    InvalidInputError,
    InvalidResponseError,
    MismatchedReplyError,
    Response,
    status_error,
)
from .constants import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_CONNECTIONS,
    DEFAULT_MAX_REPLY_BYTES,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    INITIAL_RETRY_DELAY,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
    RETRYABLE_STATUS,
)
from .facts import ModelCard
from .transport import Transport

log = logging.getLogger("dualsample_rs.client")
_timeout_scope = getattr(asyncio, "timeout", None)  # Python 3.11+
_B = TypeVar("_B", bound="HttpBackend")
_T = TypeVar("_T")
# Request ids: unique across processes (a random prefix) and within one (a counter).
_ID_PREFIX = f"ds{os.getpid():x}x{secrets.token_hex(4)}x"
_ids = itertools.count()


def new_request_id() -> str:
    """A fresh id for one request (no ``-``: rows of a request are ``{id}-{row}``)."""
    return f"{_ID_PREFIX}{next(_ids):x}"


@dataclass
class RequestStats:
    """Counts for one server: requests sent (each attempt), retries, calls that failed,
    and of the prompts whose cache use the server reported, their tokens and how many
    of those its prefix cache served."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    #: called after each attempt with its seconds and whether it failed (a gateway's
    #: metrics); not a counter, so not part of a sum over replicas (see `counters`)
    observer: Callable[[float, bool], None] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def counters(cls) -> tuple[str, ...]:
        """The names of the counts (what adds up over replicas)."""
        return tuple(f.name for f in fields(cls) if f.name != "observer")

    def observe(self, started: float, failed: bool) -> None:
        if self.observer is not None:
            self.observer(time.perf_counter() - started, failed)

    def count_cache(self, cached: int | None, prompt_tokens: int) -> None:
        if cached is not None:
            self.cached_tokens += cached
            self.prompt_tokens += prompt_tokens

    @property
    def cache_hit_rate(self) -> float | None:
        """Cached / prompt tokens, where the server reported it."""
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else None


@dataclass
class Limits:
    """How long a request may take and how often it is tried again."""

    #: seconds allowed for each whole request (connecting, sending, reading)
    timeout: float
    #: retries after the first attempt for transient failures
    max_retries: int
    #: the first back-off in seconds (it doubles with each retry, up to 8 s)
    retry_delay: float


@dataclass(frozen=True)
class ConnectionOptions:
    """How to reach a server: one object from the run's settings to the connection
    (`CoordinatorConfig.transport.connection_options()`); `HttpBackend` documents each."""

    timeout: float = DEFAULT_TIMEOUT
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    max_retries: int = DEFAULT_MAX_RETRIES
    retry_delay: float = INITIAL_RETRY_DELAY
    connection_pool_size: int | None = None
    trust_env: bool = True
    ca_bundle: str | None = None
    insecure: bool = False
    max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES


@dataclass
class Connection:
    """One server's connections and what every client of it shares: the transport, the
    headers, the URL as shown (credentials redacted), the counters, and the limits a
    client takes unless told otherwise. Clients of any dialect are made on it (see
    `HttpBackend.on`); whoever opened it closes it."""

    transport: Transport
    headers: dict[str, str]
    base_url: str
    stats: RequestStats
    limits: Limits

    @classmethod
    def open(cls, base_url: str, *, api_key: str | None = None, options: ConnectionOptions | None = None) -> Connection:
        """The connection to `base_url` with these settings (see `HttpBackend`); no
        request is sent until a client asks.

        Raises:
            InvalidInputError: a setting is out of range, the URL is not http(s), or
                the CA bundle cannot be read.
        """
        o = options or ConnectionOptions()
        timeout, ca_bundle = o.timeout, o.ca_bundle
        if not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
            raise InvalidInputError(f"timeout: must be a positive number of seconds, got {timeout!r}")
        if o.connection_pool_size is not None and o.connection_pool_size < 1:
            raise InvalidInputError(f"connection_pool_size: must be at least 1, got {o.connection_pool_size}")
        try:
            transport = Transport(
                base_url.rstrip("/"),
                limit=o.connection_pool_size or DEFAULT_CONNECTIONS,
                connect_timeout=min(o.connect_timeout, timeout),
                trust_env=o.trust_env,
                ca_bundle=ca_bundle,
                insecure=o.insecure,
                max_reply_bytes=o.max_reply_bytes,
            )
        except ValueError as err:
            raise InvalidInputError(f"base_url: {err}") from None
        except OSError as err:  # an unreadable CA bundle
            raise InvalidInputError(f"ca_bundle: {ca_bundle}: {err}") from None
        if api_key and transport.auth is not None:
            raise InvalidInputError("api_key: the URL already carries credentials; give one or the other")
        if api_key and any(c in api_key for c in "\r\n\0"):  # it goes into a header line as it is
            raise InvalidInputError("api_key: holds a line break or NUL, which no HTTP header may carry")
        try:
            (api_key or "").encode()
        except UnicodeEncodeError:
            raise InvalidInputError("api_key: is not text that UTF-8 can carry (a lone surrogate)") from None
        auth = f"Bearer {api_key}" if api_key else transport.auth
        headers = {"Authorization": auth} if auth else {}
        limits = Limits(float(timeout), o.max_retries, o.retry_delay)
        return cls(transport, headers, transport.shown, RequestStats(), limits)

    async def close(self) -> None:
        await self.transport.close()


class HttpBackend:
    """The HTTP connection to one server, which each wire dialect builds on.

    Args:
        base_url: e.g. ``"http://localhost:8000"``.
        api_key: sent as ``Authorization: Bearer``.
        timeout: seconds allowed for each whole request (connecting, sending, reading).
        connect_timeout: seconds allowed to connect.
        max_retries: retries after the first attempt for transient failures.
        retry_delay: the first back-off in seconds; it doubles with each retry, up to 8 s.
        connection_pool_size: connections kept to the server.
        trust_env: take proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY``.
        ca_bundle: a PEM file of certificate authorities for TLS (default: ``SSL_CERT_FILE``
            or the system store).
        insecure: do not verify TLS certificates (a warning says so).
        max_reply_bytes: the largest reply accepted (`ReplyTooLargeError` past it).

    Credentials in the URL (``http://user:password@host``) are sent as Basic auth;
    `base_url` shows them as ``user:***@``, and only that form reaches messages.

    A client made this way opens its connections and closes them in `aclose`; one made
    with `on` or `with_options` uses another's and leaves them open.

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
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        retry_delay: float = INITIAL_RETRY_DELAY,
        connection_pool_size: int | None = None,
        trust_env: bool = True,
        ca_bundle: str | None = None,
        insecure: bool = False,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
    ) -> None:
        options = ConnectionOptions(timeout, connect_timeout, max_retries, retry_delay, connection_pool_size,
                                    trust_env, ca_bundle, insecure, max_reply_bytes)  # fmt: skip
        connection = Connection.open(base_url, api_key=api_key, options=options)
        self._attach(connection, connection.limits, owner=True)

    @classmethod
    def on(cls: type[_B], connection: Connection, *, max_retries: int | None = None) -> _B:
        """A client of this dialect on `connection` (its connections, counters and
        limits, `max_retries` apart when given); closing it leaves them open."""
        limits = connection.limits if max_retries is None else replace(connection.limits, max_retries=max_retries)
        return cls._borrowing(connection, limits)

    @classmethod
    def _borrowing(cls: type[_B], connection: Connection, limits: Limits) -> _B:
        # Not through __init__, which opens connections of its own.
        client = cls.__new__(cls)
        client._attach(connection, limits, owner=False)
        return client

    def _attach(self, connection: Connection, limits: Limits, owner: bool) -> None:
        self._connection = connection
        self._transport = connection.transport
        self._headers = connection.headers
        # The headers of a request with a body, made once rather than per request.
        self._json_headers = {**connection.headers, "Content-Type": "application/json"}
        self.base_url = connection.base_url
        self.stats = connection.stats
        self.timeout = limits.timeout
        self.max_retries = limits.max_retries
        self.initial_retry_delay = limits.retry_delay
        self.model: str | None = None
        self._owner = owner

    async def __aenter__(self: _B) -> _B:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connections, if this client opened them."""
        if self._owner:
            await self._connection.close()

    def with_options(self: _B, *, timeout: float | None = None, max_retries: int | None = None) -> _B:
        """A client sharing this one's connections and counters, with other limits; closing
        it leaves the connections open."""
        limits = Limits(
            self.timeout if timeout is None else float(timeout),
            self.max_retries if max_retries is None else max_retries,
            self.initial_retry_delay,
        )
        clone = type(self)._borrowing(self._connection, limits)
        clone.model = self.model
        return clone

    # ------------------------------------------------------------ retry policy
    def should_retry(self, err: APIError) -> bool:
        if isinstance(err, (CertificateError, IncompleteReplyError)):
            return False
        if isinstance(err, (APIConnectionError, InvalidResponseError)):
            return True
        if isinstance(err, APIStatusError):
            return err.status_code in RETRYABLE_STATUS or err.status_code >= 500
        return False

    def retry_delay(self, attempt: int, response: Response | None) -> float:
        """Retry-After (ms or seconds or an HTTP date) when given and within the cap,
        else min(retry_delay·2^attempt, 8) s scaled by a jitter in [0.75, 1]."""
        after = parse_retry_after(response.headers) if response is not None else None
        if after is not None and 0 <= after <= MAX_RETRY_AFTER:
            return after
        return min(self.initial_retry_delay * 2.0**attempt, MAX_RETRY_DELAY) * (1 - 0.25 * random.random())

    async def _send(self, method: str, path: str, data: bytes | None, request_id: str | None) -> Response:
        headers = dict(self._json_headers if data is not None else self._headers)
        if request_id is not None:
            headers["X-Request-Id"] = request_id
        if _timeout_scope is not None:  # no extra task per request, unlike wait_for
            async with _timeout_scope(self.timeout):
                reply = await self._transport.request(method, path, headers, data)
        else:
            reply = await asyncio.wait_for(self._transport.request(method, path, headers, data), self.timeout)
        return Response(reply.status, reply.headers, reply.body, method, self.base_url + path)

    # With `decode` the result is what it returns; without, the reply's JSON (any shape).
    @overload
    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content: bytes | Callable[[str], bytes] | None = None,
        probe: bool = False,
        decode: None = None,
    ) -> Any: ...

    @overload
    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content: bytes | Callable[[str], bytes] | None = None,
        probe: bool = False,
        *,
        decode: Callable[[bytes, str], _T],
    ) -> _T: ...

    async def _request(
        self,
        method: str,
        path: str,
        body: Any = None,
        content: bytes | Callable[[str], bytes] | None = None,
        probe: bool = False,
        decode: Callable[[bytes, str], _T] | None = None,
    ) -> Any:
        """Send with retries. Each attempt has a request id of its own (in the
        ``X-Request-Id`` header); `content` may be a function of it, for bodies that
        carry it, and `decode(body, request_id)` turns a 2xx body into the result
        (default: JSON), raising `InvalidResponseError` for a malformed one, which is
        retried like a transient fault (`MismatchedReplyError`, a reply to another
        request, also drops the connections). `probe`: a non-transient error answer is an
        expected outcome (raised at once, not counted as a failure)."""
        url = self.base_url + path
        fixed = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.max_retries + 1):
            response: Response | None = None
            self.stats.requests += 1
            rid = new_request_id()
            data = content(rid) if callable(content) else content if content is not None else fixed
            started = time.perf_counter()
            try:
                response = await self._send(method, path, data, rid)
            except asyncio.TimeoutError as exc:
                err: APIError = APITimeoutError(f"timed out: {method} {url}", (method, url))
                cause: BaseException = exc
            except APIError as exc:  # a certificate that did not verify, a reply over the cap
                err, cause = exc, exc
            except OSError as exc:  # refused, reset, torn body, not HTTP
                err = APIConnectionError(f"connection error: {method} {url}: {exc!r}", (method, url))
                cause = exc
            else:
                if 200 <= response.status_code < 300:
                    try:
                        result = decode(response.content, rid) if decode else json_body(response.content)
                        self.stats.observe(started, False)
                        return result
                    except InvalidResponseError as exc:
                        err = type(exc)(f"{method} {url}: {exc}", (method, url))
                        cause = exc
                        if isinstance(exc, MismatchedReplyError):
                            await self._transport.reset()
                else:
                    try:
                        data_ = json_body(response.content)
                    except InvalidResponseError:
                        data_ = None
                    err = self.read_error(response, data_)
                    cause = err
            expected = probe and isinstance(err, APIStatusError) and not self.should_retry(err)
            self.stats.observe(started, not expected)  # a probe's expected answer is no failure
            if expected:
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

    def read_error(self, response: Response, body: Any) -> APIStatusError:
        """The exception for an error answer, `body` its decoded JSON (None when it is
        not JSON). Each dialect reads its engine's error bodies; this client, which
        knows no engine, gives the status alone."""
        return status_error(response, None, body)

    # ------------------------------------------------------------ shared endpoints
    async def models(self) -> list[ModelCard]:
        """The served models' cards (``/v1/models``, which vLLM and SGLang both answer)."""
        data = await self._request("GET", "/v1/models")
        cards = data.get("data") if isinstance(data, dict) else None
        return [card for card in map(model_card, cards if isinstance(cards, list) else []) if card is not None]

    async def answers(self, path: str) -> bool:
        """Whether the server answers ``GET path`` (2xx): an error status is a no (not
        counted as a failure when it is not transient); a server that cannot be reached
        raises."""
        try:
            await self._request("GET", path, probe=True)
        except APIStatusError:
            return False
        return True

    async def post_json(self, path: str, body: Any, probe: bool = False) -> Any:
        return await self._request("POST", path, body, probe=probe)

    async def get_json(self, path: str, probe: bool = False) -> Any:
        return await self._request("GET", path, probe=probe)


def model_card(data: Any) -> ModelCard | None:
    """A card of ``/v1/models`` (OpenAI's shape, with vLLM's ``max_model_len``); None for
    an entry without an id."""
    if not isinstance(data, dict) or not isinstance(data.get("id"), str):
        return None
    length = data.get("max_model_len")
    owner = data.get("owned_by")
    return ModelCard(
        id=data["id"],
        max_model_len=length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None,
        owned_by=str(owner) if owner is not None else None,
    )


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            return value if math.isfinite(value) else None
        except ValueError:
            pass
    raw = lower.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return value if math.isfinite(value) else None
    except ValueError:
        pass
    import email.utils  # here: an HTTP date is rare, and the email package slows start-up

    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return when.timestamp() - time.time()


def json_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidResponseError(f"malformed JSON body: {exc}") from exc
