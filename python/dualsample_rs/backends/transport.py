"""HTTP for one server: kept-alive connections, proxies, TLS, a size cap.

Plain ``http://`` with no proxy goes through `http11.Http11Pool` (asyncio connections,
replies parsed by llhttp through httptools), everything else through aiohttp, which
parses with the same llhttp and is what vLLM's and SGLang's own benchmark clients use;
each one's cost per request is in `benches/bench_http.py`. This module adds what a
sampling run needs on top of them and nothing else:

- one session per server (created in the running event loop, made again if the loop
  changes), its connections capped by the pool size;
- proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` unless told not to;
- TLS verified against a given CA bundle, ``SSL_CERT_FILE`` or the system store, or
  not verified at all when asked (with a warning);
- credentials in the URL sent as Basic auth (`auth`, an Authorization header the
  client adds) and never shown: `redact` is the only form
  of the URL that reaches a message, a log line or a record;
- a cap on the size of a reply, checked while it is read;
- `reset`, which drops every connection, for when a reply showed that a connection's
  stream is out of step with its requests.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import urllib.parse
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exceptions import CertificateError, ReplyTooLargeError
from .http11 import Http11Pool, ReplyError

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("dualsample_rs.client")
# aiohttp's threshold for its warning about large byte bodies (see `Transport.request`).
LARGE_BODY = 1 << 20


@dataclass
class Reply:
    status: int
    #: as aiohttp parsed them (a read-only, case-insensitive mapping)
    headers: Mapping[str, str]
    body: bytes


def split_credentials(url: str) -> tuple[str, str | None, str]:
    """``(url without credentials, an Authorization header of Basic auth from them or
    None, url shown to people)``.

    Raises:
        ValueError: not an http(s) URL with a host (the message shows it redacted).
    """
    shown = redact(url)
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ValueError(f"{shown}: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"expected an http(s) URL with a host, got {shown!r}")
    auth = None
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(pair.encode()).decode()
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    netloc = host if port is None else f"{host}:{port}"
    clean = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    return clean, auth, shown


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (``http://user:***@host``)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    netloc, slash, path = rest.partition("/")
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        return url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{hostport}{slash}{path}"


def env_proxy(url: str) -> str | None:
    """The proxy ``HTTP_PROXY`` / ``HTTPS_PROXY`` (either case) name for `url`, unless
    ``NO_PROXY`` covers its host."""
    # Imported here: urllib.request brings http.client and the email package, a tenth
    # of the command's start-up, for two calls per server at start-up.
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if not proxy or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def ssl_context(ca_bundle: str | None, insecure: bool) -> ssl.SSLContext | bool:
    """What aiohttp's ``ssl=`` takes: a verifying context (the given bundle, else
    ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` or the system store), or False for no checks."""
    if insecure:
        return False
    if ca_bundle is not None:
        return ssl.create_default_context(cafile=ca_bundle)
    return ssl.create_default_context()  # honours SSL_CERT_FILE and SSL_CERT_DIR


class Transport:
    """Requests to one server, shared by every client on its `http.Connection`.

    Args:
        url: the server's base URL (credentials allowed: they become Basic auth).
        limit: connections kept to the server.
        connect_timeout: seconds allowed to connect.
        trust_env: take proxies (and ``~/.netrc``) from the environment.
        ca_bundle: a PEM file of certificate authorities to verify TLS with.
        insecure: do not verify TLS certificates.
        max_reply_bytes: the largest reply body accepted.
    """

    def __init__(
        self,
        url: str,
        *,
        limit: int,
        connect_timeout: float,
        trust_env: bool = True,
        ca_bundle: str | None = None,
        insecure: bool = False,
        max_reply_bytes: int,
    ) -> None:
        self.url, self.auth, self.shown = split_credentials(url)
        self.limit, self.connect_timeout = limit, connect_timeout
        self.max_reply_bytes = max_reply_bytes
        self.insecure = insecure
        self.ssl = ssl_context(ca_bundle, insecure) if self.url.startswith("https:") else None
        # Looked up once: aiohttp's trust_env reads the environment (and ~/.netrc) again on
        # every request, which tripled the client's cost per request.
        self.proxy = env_proxy(self.url) if trust_env else None
        # Plain http with no proxy between (the usual case: servers on this host or
        # network) goes through the lean pool; TLS and proxies through aiohttp.
        parts = urllib.parse.urlsplit(self.url)
        self._plain: Http11Pool | None = None
        if parts.scheme == "http" and self.proxy is None:
            self._plain = Http11Pool(parts.hostname or "", parts.port or 80, parts.path, limit=limit,
                                     connect_timeout=connect_timeout, max_reply_bytes=max_reply_bytes,
                                     too_large=self._too_large)  # fmt: skip
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _current(self) -> aiohttp.ClientSession:
        # Imported here: a run whose servers are all plain http never needs it, and its
        # import (an SSL context with the system's certificates among it) is not cheap.
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._loop is not loop or self._session.closed:
            if self.insecure:
                warnings.warn(f"{self.shown}: TLS certificates are not verified (insecure)", stacklevel=3)
            connector = aiohttp.TCPConnector(limit=self.limit, ssl=self.ssl if self.ssl is not None else True)
            # The run's deadline covers each whole request (see HttpBackend); aiohttp's own
            # timeouts only bound connecting.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout, proxy=self.proxy)
            self._loop = loop
        return self._session

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        """Send one request and read its whole reply, at most `max_reply_bytes` of body.

        Raises:
            ReplyTooLargeError: the reply is larger than the cap.
            CertificateError: the server's TLS certificate did not verify.
            OSError: the connection failed or the reply is not HTTP (`ReplyError` where
                the cause is not an OSError of the socket's own).
        """
        if self._closed:
            raise ReplyError("the client is closed")
        if self._plain is not None:
            status, got, data = await self._plain.request(method, path, headers, body)
            return Reply(status, got, data)
        import aiohttp

        session = self._current()
        payload: Any = body
        if body is not None and len(body) > LARGE_BODY:
            # aiohttp warns that large raw bytes "might lock the event loop": they are one
            # non-blocking transport.write, buffered by asyncio, so say it without the warning.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                payload = aiohttp.BytesPayload(body, content_type="application/json")
        try:
            async with session.request(method, self.url + path, data=payload, headers=headers) as resp:
                declared = resp.content_length
                if declared is not None and declared > self.max_reply_bytes:
                    resp.close()  # never reuse a connection with an unread body
                    raise self._too_large(f"{declared} bytes declared")
                try:
                    # Read piece by piece and counted even with a declared length: that length
                    # is of the encoded body, and a compressed one may inflate past the cap.
                    data = await self._read(resp)
                except BaseException:
                    resp.close()
                    raise
                return Reply(resp.status, resp.headers, data)
        except aiohttp.ClientConnectorCertificateError as err:
            raise CertificateError(
                f"{self.shown}: the server's TLS certificate did not verify ({err.certificate_error}); give its CA "
                "with --ca-bundle (or SSL_CERT_FILE), or --insecure to skip verification"
            ) from None
        except aiohttp.ClientError as err:  # refused, reset, torn body, not HTTP
            raise ReplyError(f"{type(err).__name__}: {err}") from err

    async def _read(self, resp: aiohttp.ClientResponse) -> bytes:
        cap = self.max_reply_bytes
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                return b"".join(chunks)
            size += len(chunk)
            if size > cap:
                raise self._too_large(f"over {size} bytes read")
            chunks.append(chunk)

    def _too_large(self, seen: str) -> ReplyTooLargeError:
        return ReplyTooLargeError(
            f"{self.shown}: a reply larger than the cap of {self.max_reply_bytes} bytes ({seen}); "
            "raise it with --max-reply-mb (CoordinatorConfig(max_reply_bytes=...))"
        )

    async def reset(self) -> None:
        """Drop every connection (requests in flight on them fail and are retried): a
        reply showed that some connection's stream no longer lines up with its requests."""
        session, self._session = self._session, None
        if self._plain is not None or (session is not None and not session.closed):
            log.warning("%s: a reply did not answer its request; reconnecting", self.shown)
        if self._plain is not None:
            self._plain.close_all()
        if session is not None and not session.closed:
            await session.close()

    async def close(self) -> None:
        self._closed = True
        if self._plain is not None:
            self._plain.close()
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()
