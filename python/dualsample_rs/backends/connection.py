"""A small HTTP/1.1 client for one server: kept-alive connections, JSON bodies, nothing else.

Design notes. Every step sends one request per server (one per sequence in the
tokens-in/out dialect), so the client's own cost per request is most of the
coordinator's. Measured on this project's loopback with 64 small requests in flight:
httpx's connection pool took over 2 ms of CPU per request (its bookkeeping grows with
the requests waiting), httpx over an aiohttp transport ~220 µs, aiohttp itself 85–155
µs (growing with the requests in flight); this client does the one thing needed — write
a request, read a response with a length or chunked body — in a fraction of that
(`benches/bench_http.py`). TLS is supported through the standard library's `ssl`.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import urllib.parse
from dataclasses import dataclass


class ProtocolError(ConnectionError):
    """The server's answer is not HTTP/1.x as this client reads it."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class _Connection(asyncio.Protocol):
    """One connection; one request at a time. `reply` resolves when a whole response has
    arrived, or fails when the connection ends first."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.reply: asyncio.Future[Reply] | None = None
        self.closed = False
        self.received = False  # any byte of the current response
        self.keep_alive = True
        self._head: tuple[int, dict[str, str]] | None = None
        self._length: int | None = None
        self._chunked = False
        self._chunks = bytearray()

    # --------------------------------------------------------------- asyncio
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received = True
        self.buf += data
        try:
            self._parse()
        except ProtocolError as err:
            self._fail(err)

    def eof_received(self) -> bool:
        # A response without a length ends with the connection.
        if self._head is not None and self._length is None and not self._chunked:
            self._done(bytes(self.buf))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("the server closed the connection"))

    # --------------------------------------------------------------- requests
    def send(self, parts: tuple[bytes, ...]) -> asyncio.Future[Reply]:
        assert self.transport is not None
        self.reply = asyncio.get_running_loop().create_future()
        self.received = False
        self._head, self._length, self._chunked = None, None, False
        self._chunks.clear()
        for part in parts:
            self.transport.write(part)
        return self.reply

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, err: BaseException) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(err)

    def _done(self, body: bytes) -> None:
        assert self._head is not None
        status, headers = self._head
        self.buf.clear()
        self._head = None
        if self.reply is not None and not self.reply.done():
            self.reply.set_result(Reply(status, headers, body))

    def _parse(self) -> None:
        if self._head is None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > 1 << 20:
                    raise ProtocolError("response headers over 1 MiB")
                return
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            del self.buf[: end + 4]
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ProtocolError(f"bad header line {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
            status = int(parts[1])
            if 100 <= status < 200:  # an interim answer: the real one follows
                self._parse()
                return
            self._head = (status, headers)
            if status in (204, 304):
                self._done(b"")
                return
            self.keep_alive = parts[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._chunked = True
            elif "content-length" in headers:
                try:
                    self._length = int(headers["content-length"])
                except ValueError:
                    raise ProtocolError(f"bad Content-Length {headers['content-length']!r}") from None
            else:
                self.keep_alive = False  # the body runs to the end of the connection
        if self._chunked:
            self._parse_chunks()
        elif self._length is not None and len(self.buf) >= self._length:
            body = bytes(self.buf[: self._length])
            self._done(body)

    def _parse_chunks(self) -> None:
        while True:
            end = self.buf.find(b"\r\n")
            if end < 0:
                return
            size_text = bytes(self.buf[:end]).split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_text[:20]!r}") from None
            if size == 0:
                trailer = self.buf.find(b"\r\n\r\n", end)
                if trailer < 0:
                    return
                del self.buf[: trailer + 4]
                self._done(bytes(self._chunks))
                return
            if len(self.buf) < end + 2 + size + 2:
                return
            self._chunks += self.buf[end + 2 : end + 2 + size]
            del self.buf[: end + 2 + size + 2]


class ConnectionPool:
    """Up to `limit` kept-alive connections to the server at `base_url`."""

    def __init__(self, base_url: str, limit: int, connect_timeout: float) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"expected an http(s) URL, got {base_url!r}")
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.ssl = ssl.create_default_context() if url.scheme == "https" else None
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if url.port is None else f"{host}:{url.port}"
        self.limit, self.connect_timeout = limit, connect_timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._open = 0
        self._closed = False
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def request(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Reply:
        """Send one request and read its response. A kept-alive connection the server
        closed in the meantime is replaced once, transparently."""
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\nAccept-Encoding: identity\r\n"
        for name, value in headers.items():
            head += f"{name}: {value}\r\n"
        # Head and body go to the socket separately: joining them would copy the body again.
        parts = (
            ((head + f"Content-Length: {len(body)}\r\n\r\n").encode(), body)
            if body is not None
            else ((head + "\r\n").encode(),)
        )
        for attempt in (0, 1):
            conn, reused = await self._acquire()
            try:
                reply = await conn.send(parts)
            except BaseException as err:
                conn.close()
                self._release(conn)
                if attempt == 0 and reused and not conn.received and isinstance(err, ConnectionError):
                    continue
                raise
            if not conn.keep_alive:
                conn.close()
            self._release(conn)
            return reply
        raise AssertionError("unreachable")

    async def _acquire(self) -> tuple[_Connection, bool]:
        if self._closed:
            raise ConnectionError("the client is closed")
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    return conn, True
                self._open -= 1
            if self._open < self.limit:
                self._open += 1
                try:
                    _, conn = await asyncio.wait_for(
                        asyncio.get_running_loop().create_connection(_Connection, self.host, self.port, ssl=self.ssl),
                        self.connect_timeout,
                    )
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
                return conn, False
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if not waiter.cancelled() and waiter.done():
                    self._wake()  # pass the turn on
                raise

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
        if conn.closed:
            self._open -= 1
        else:
            self._idle.append(conn)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def close(self) -> None:
        """Close the idle connections now and the others as their requests end."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
            self._open -= 1
