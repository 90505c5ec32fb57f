"""Plain HTTP/1.1 to one server with no proxy between: kept-alive connections on asyncio,
replies parsed by llhttp (through httptools, the parser aiohttp's C extension also wraps).

A sampling run spends most of its client time on small requests to servers on the same
host or network (a ``/tokenize`` per prompt, a step per round), where aiohttp's session
costs a third or more above this path's CPU per request (``benches/bench_http.py``). So
`transport.Transport` sends plain ``http://`` requests that no proxy takes through
`Http11Pool`, and everything else (TLS, proxies) through aiohttp.

What it keeps of aiohttp's checks: llhttp's strict parsing (a malformed reply is an error
at once, never a hang), the reply's size cap while reading (a declared length past it is
refused before reading; a gzip or deflate body is capped as it inflates), a connection
used again only when its reply ended cleanly and nothing arrived after it (a duplicated
or stray reply closes the connection instead of answering the next request), connections
dropped when their request is cancelled or times out, and idle connections the server
closed never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import urllib.parse
import zlib
from collections.abc import Callable
from typing import cast

import aiohappyeyeballs
import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from .._core import __version__
from ..exceptions import ReplyTooLargeError

USER_AGENT = f"dualsample_rs/{__version__}"
# The most bytes of a reply's status line and headers (aiohttp allows 8190 a line): past
# it the reply is refused, before llhttp's joining of header pieces gets costly.
MAX_HEAD_BYTES = 1 << 16
# Replies that have no body whatever their headers say (RFC 9110, 6.4.1).
NO_BODY = (204, 304)


class ReplyError(ConnectionError):
    """The connection ended before a whole reply, or what came is not HTTP."""


class _Connection(asyncio.Protocol):
    """One kept-alive connection: at most one request in flight, its reply read by llhttp."""

    def __init__(self, cap: int, too_large: Callable[[str], ReplyTooLargeError]) -> None:
        self._cap, self._too_large = cap, too_large
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._waiter: asyncio.Future[tuple[int, CIMultiDictProxy[str], bytes]] | None = None
        # One parser for the connection's life: llhttp reads consecutive replies on a
        # kept-alive stream, and after an error the connection is closed.
        self._parser = httptools.HttpResponseParser(self)
        self._reset_reply()

    def _reset_reply(self) -> None:
        self._headers: list[tuple[str, str]] = []
        self._reply_headers: CIMultiDict[str] = CIMultiDict()
        self._body: list[bytes] = []
        self._size = 0
        self._inflate: zlib._Decompress | None = None
        self._status = 0
        self._headers_done = False
        self._head_bytes = 0
        self._to_close = False  # the reply's length is where the connection ends

    # ------------------------------------------------------------ asyncio's side
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always a subclass of asyncio's (uvloop's is not).
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes with no request waiting: a stray or duplicated reply. The stream no
            # longer lines up with its requests, so the connection is never used again.
            self.close()
            return
        if not self._headers_done:
            self._head_bytes += len(data)  # with the first body bytes, in the chunk that ends the head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as err:  # raised by one of ours below
            cause = err.__context__
            self._fail(cause if isinstance(cause, (ReplyError, ReplyTooLargeError)) else ReplyError(repr(cause)))
        except httptools.HttpParserUpgrade:
            self._fail(ReplyError("the server switched protocols"))
        except httptools.HttpParserError as err:
            self._fail(ReplyError(f"the reply is not valid HTTP: {err}"))
        else:
            if not self._headers_done and self._head_bytes > MAX_HEAD_BYTES:
                self._fail(ReplyError(f"the reply's headers are over {MAX_HEAD_BYTES} bytes"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        if self._headers_done and self._to_close:  # a body that runs to the end of the stream
            self._finish()
            return
        why = f": {exc!r}" if exc is not None else ""
        waiter.set_exception(ReplyError(f"the server closed the connection before a whole reply{why}"))

    # ------------------------------------------------------------ llhttp's callbacks
    def on_message_begin(self) -> None:
        if self._headers_done and not self._is_interim():
            raise ReplyError("a second reply to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        self._headers_done = True
        if self._is_interim():
            return
        headers = self._reply_headers = CIMultiDict(self._headers)
        declared = headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > self._cap:
            raise self._too_large(f"{declared} bytes declared")
        coding = headers.get("Content-Encoding", "identity").strip().lower()
        if coding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._inflate = zlib.decompressobj()
        elif coding != "identity":
            raise ReplyError(f"a body in an encoding not asked for: {coding}")
        chunked = "chunked" in headers.get("Transfer-Encoding", "").lower()
        self._to_close = declared is None and not chunked and self._status not in NO_BODY

    def on_body(self, chunk: bytes) -> None:
        if self._inflate is not None:
            room = self._cap - self._size + 1
            chunk = self._inflate.decompress(chunk, room)
            if self._inflate.unconsumed_tail:
                raise self._too_large(f"over {self._size + len(chunk)} bytes inflated")
        self._size += len(chunk)
        if self._size > self._cap:
            raise self._too_large(f"over {self._size} bytes read")
        self._body.append(chunk)

    def on_message_complete(self) -> None:
        if self._is_interim():  # 1xx: the reply proper is still to come
            self._reset_reply()
            return
        if not self._parser.should_keep_alive():
            self._to_close = True
        self._finish()

    # ------------------------------------------------------------ ours
    def _is_interim(self) -> bool:
        return 100 <= self._status < 200

    def _finish(self) -> None:
        if self._inflate is not None:
            if not self._inflate.eof and self._size:
                self._fail(ReplyError("the compressed body ends before its end mark"))
                return
            tail = self._inflate.flush()
            self._size += len(tail)
            if self._size > self._cap:
                self._fail(self._too_large(f"over {self._size} bytes inflated"))
                return
            self._body.append(tail)
        waiter, self._waiter = self._waiter, None
        if self._to_close:
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result((self._status, CIMultiDictProxy(self._reply_headers), b"".join(self._body)))

    def _fail(self, err: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(err)

    @property
    def reusable(self) -> bool:
        return (
            not self.closed and self._waiter is None and self.transport is not None and not self.transport.is_closing()
        )

    async def send(self, request: bytes) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """Write one request and wait for its whole reply."""
        assert self._waiter is None
        if not self.reusable or self.transport is None:
            # Closed by the server before the request was written (a port proxy accepts
            # and closes while the server behind it starts): asyncio would drop the bytes
            # and leave the reply to the deadline.
            raise ReplyError("the server closed the connection before the request was sent")
        self._reset_reply()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            self.transport.write(request)
        except RuntimeError as err:  # uvloop: a transport closed under us
            self._waiter = None
            raise ReplyError(f"the connection closed before the request was sent: {err}") from None
        return await self._waiter

    def close(self) -> None:
        """Close it, also where its event loop has gone (nothing more can be done there)."""
        self.closed = True
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # its loop is closed
                self.transport.close()


class Http11Pool:
    """Kept-alive HTTP/1.1 connections to one ``http://`` server, at most `limit` of them.

    Args:
        host, port: where the server listens.
        prefix: the base URL's path, put before every request's path.
        limit: connections open at once (requests past it wait for one).
        connect_timeout: seconds allowed to connect.
        max_reply_bytes: the largest reply body accepted (after inflating).
        too_large: the error for a reply past the cap, given what was seen.
    """

    def __init__(
        self,
        host: str,
        port: int,
        prefix: str,
        *,
        limit: int,
        connect_timeout: float,
        max_reply_bytes: int,
        too_large: Callable[[str], ReplyTooLargeError],
    ) -> None:
        self.host, self.port = host, port
        # Percent-encoded as aiohttp's URLs are, so that the request line is ASCII.
        self.prefix = urllib.parse.quote(prefix, safe="/%:@!$&'()*+,;=-._~")
        self.limit, self.connect_timeout = limit, connect_timeout
        self.max_reply_bytes, self._too_large = max_reply_bytes, too_large
        name = f"[{host}]" if ":" in host else host
        hostport = name if port == 80 else f"{name}:{port}"
        self._fixed = f"Host: {hostport}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\n"
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._slots: asyncio.Semaphore | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    def _bind(self) -> asyncio.Semaphore:
        """The pool's slots in the running loop; a new loop starts with no connections
        (those of an earlier loop cannot be used in this one)."""
        loop = asyncio.get_running_loop()
        if self._slots is None or self._loop is not loop:
            self.close_all()
            self._slots = asyncio.Semaphore(self.limit)
            self._loop = loop
        return self._slots

    def head(self, method: str, path: str, headers: dict[str, str], length: int | None) -> bytes:
        """The request line and headers (`length`: the body's, None without a body)."""
        lines = [f"{method} {self.prefix}{path} HTTP/1.1\r\n", self._fixed]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode()  # UTF-8, as aiohttp sends header values

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """``(status, headers, body)`` of one request's reply.

        Raises:
            ReplyTooLargeError: the reply is larger than the cap.
            ReplyError, OSError: the connection failed or the reply is not HTTP.
        """
        message = self.head(method, path, headers, None if body is None else len(body))
        if body:
            message += body
        async with self._bind():
            conn = self._take() or await self._connect()
            if self._closed:  # closed while connecting
                conn.close()
                self._open.discard(conn)
                raise ReplyError("the client is closed")
            try:
                reply = await conn.send(message)
            except BaseException:  # cancelled, timed out or failed: its stream is unknown
                conn.close()
                self._open.discard(conn)
                raise
            if conn.reusable:
                self._idle.append(conn)
            else:
                self._open.discard(conn)
            return reply

    def _take(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if conn.reusable:
                return conn
            self._open.discard(conn)
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()

        async def connecting() -> _Connection:
            # Every address of the name, tried in turn a quarter second apart with both
            # families interleaved (aiohttp's "happy eyeballs", by the same library), so
            # that a dead address (a broken IPv6 route) costs no connect timeout.
            found = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
            sock = await aiohappyeyeballs.start_connection(found, happy_eyeballs_delay=0.25, interleave=1)
            try:
                _, conn = await loop.create_connection(
                    lambda: _Connection(self.max_reply_bytes, self._too_large), sock=sock
                )
            except BaseException:
                sock.close()
                raise
            return conn

        conn = await asyncio.wait_for(connecting(), self.connect_timeout)
        self._open.add(conn)
        return conn

    def close_all(self) -> None:
        """Close every connection: idle ones, and those with a request in flight (which
        then fail)."""
        for conn in list(self._open):
            conn.close()
        self._open.clear()
        self._idle.clear()

    def close(self) -> None:
        """Close every connection, and open no more."""
        self._closed = True
        self.close_all()
