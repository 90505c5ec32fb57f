"""The HTTP transport against odd servers and proxies over real sockets: no hang, no
unbounded memory, no reply used for another request, credentials never shown, proxies
and TLS as users of HTTP clients expect."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import resource
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from dualsample_rs import CoordinatorConfig, DualVLLMCoordinator, VLLMClient
from dualsample_rs.backends.http11 import ReplyError, _Connection
from dualsample_rs.backends.transport import redact
from dualsample_rs.exceptions import (
    APIConnectionError,
    APIError,
    APITimeoutError,
    CertificateError,
    IncompleteReplyError,
    InvalidInputError,
    ReplyTooLargeError,
)
from support import QUESTIONS, generate_cli, wait_cli, write_input

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[str]:
    """A TCP server on loopback whose every connection is `handler`'s: its base URL."""

    open_writers: set[asyncio.StreamWriter] = set()

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        open_writers.add(writer)
        try:
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await handler(reader, writer)
        finally:
            writer.close()
            open_writers.discard(writer)

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in list(open_writers):
            writer.close()
        await asyncio.sleep(0)


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's (or reply's) head and body (its Content-Length, else none)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


async def read_reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply with a Content-Length (as the reference server sends them)."""
    head, body = await read_request(reader)
    return head + body


def answering(reply: bytes) -> Handler:
    """Answer every request on the connection with `reply` (raw bytes)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()

    return handle


async def tokenize_once(url: str, **client: object) -> tuple[object, float, VLLMClient]:
    """One /tokenize call: (result or error, seconds taken, the client)."""
    c = VLLMClient(url, **client)  # type: ignore[arg-type]
    t0 = time.monotonic()
    try:
        result: object = await c.tokenize("x")
    except Exception as err:
        result = err
    finally:
        await c.aclose()
    return result, time.monotonic() - t0, c


def tokenize_against(handler: Handler, timeout: float = 3.0, **client: object) -> tuple[object, float]:
    """A /tokenize call against a raw server: (result or error, seconds taken)."""

    async def go() -> tuple[object, float]:
        async with raw_server(handler) as url:
            result, took, _ = await tokenize_once(url, max_retries=1, timeout=timeout, retry_delay=0.01, **client)
            return result, took

    return asyncio.run(go())


OK_BODY = b'{"tokens": [1, 2], "count": 2}'
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(OK_BODY), OK_BODY)


def test_a_negative_chunk_size_is_an_error_not_a_hang() -> None:
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-6\r\nabcdef\r\n0\r\n\r\n"
    result, took = tokenize_against(answering(reply))
    assert isinstance(result, APIConnectionError), result
    assert took < 2.5  # both attempts failed at once, well before the 3 s deadline


def test_an_endless_body_stops_at_the_cap() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))
        while True:
            writer.write(chunk)
            await writer.drain()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, took = tokenize_against(endless, timeout=20.0, max_reply_bytes=8 << 20)
    assert isinstance(result, ReplyTooLargeError), result
    assert "8388608 bytes" in str(result) and "--max-reply-mb" in str(result)
    assert took < 10
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200


def test_a_declared_length_over_the_cap_is_refused_before_reading() -> None:
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999\r\n\r\n"
    result, _ = tokenize_against(answering(reply), max_reply_bytes=1 << 20)
    assert isinstance(result, ReplyTooLargeError)
    assert "999999999999 bytes declared" in str(result)


def test_a_compressed_body_that_inflates_past_the_cap_is_refused() -> None:
    """The declared length is of the encoded body: the cap is on what it inflates to."""
    import gzip

    packed = gzip.compress(b'{"tokens": [' + b"1," * (1 << 20) + b"1]}")
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%s" % (len(packed), packed)
    assert len(packed) < 1 << 16
    result, _ = tokenize_against(answering(reply), max_reply_bytes=1 << 20)
    assert isinstance(result, ReplyTooLargeError), result


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 100 Continue\r\n\r\n" * 2000 + OK,
        "HTTP/1.1 ²00 OK\r\nContent-Length: 2\r\n\r\n{}".encode(),
        OK.replace(b"\r\n", b"\n"),
        OK.replace(b"Content-Type: application/json\r\n", b"X-Folded: a\r\n b\r\nContent-Type: application/json\r\n"),
    ],
    ids=["2000 interim answers", "a status that is not ASCII digits", "bare LF", "folded header"],
)
def test_odd_replies_end_cleanly_and_quickly(reply: bytes) -> None:
    result, took = tokenize_against(answering(reply))
    # aiohttp's parser either reads them (lenient) or refuses them at once: never a
    # traceback of our own, never a wait for the deadline
    assert result == [1, 2] or isinstance(result, APIConnectionError), result
    assert took < 2.5


def test_credentials_in_the_url_are_sent_as_basic_auth_and_never_shown() -> None:
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        seen.append(head)
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()

    async def go() -> Exception:
        async with raw_server(handle) as url:
            c = VLLMClient(url.replace("http://", "http://alice:s3cr%40t@"), max_retries=0)
            try:
                await c.tokenize("x")
            except Exception as err:
                return err
            finally:
                await c.aclose()
        raise AssertionError("no error")

    err = asyncio.run(go())
    assert "s3cr" not in str(err) and "alice:***@" in str(err)
    expected = base64.b64encode(b"alice:s3cr@t")
    assert b"Authorization: Basic " + expected in seen[0]
    assert redact("https://u:p@h:1/x") == "https://u:***@h:1/x" and redact("http://h/x") == "http://h/x"


def test_a_bad_url_is_named_in_its_error() -> None:
    with pytest.raises(InvalidInputError, match=r"http://\[::1:8000.*Invalid IPv6"):
        VLLMClient("http://[::1:8000")
    with pytest.raises(InvalidInputError, match="carries credentials"):
        VLLMClient("http://a:b@localhost:1", api_key="k")


def test_credentials_never_reach_records(tmp_path: Path) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 3)
    # nothing listens on these ports: every record fails, and says why
    urls = ("http://bob:hunter2@127.0.0.1:9", "http://bob:hunter2@127.0.0.1:9")
    code, err = wait_cli(generate_cli(urls, inp, out, "--max-retries", "0", "--retry-delay", "0"))
    assert code == 2
    assert "hunter2" not in err and "bob:***@" in err


# ------------------------------------------------------------ a duplicated reply
def duplicating_proxy(target_port: int, every: int) -> Handler:
    """Forward each request to `target_port`; every `every`-th reply is sent twice, so
    the client's next request on this connection would read a stale reply."""
    count = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        try:
            while True:
                head, body = await read_request(reader)
                up_writer.write(head + body)
                await up_writer.drain()
                reply = await read_reply(up_reader)
                count[0] += 1
                writer.write(reply * (2 if count[0] % every == 0 else 1))
                await writer.drain()
        finally:
            up_writer.close()

    return handle


@pytest.mark.parametrize("flavor", ["vllm-completions", "vllm-generate", "sglang"])
def test_a_duplicated_reply_is_never_read_as_the_next_one(
    flavor: str, generate_pair: tuple[str, str], sglang_pair: tuple[str, str]
) -> None:
    config = dict(dialect=flavor, seed=5, max_retries=6, retry_delay=0.01, max_concurrency=4, max_batch_size=2)

    async def run(theta: str, teacher: str) -> list[tuple]:
        cfg = CoordinatorConfig(theta_url=theta, t_url=teacher, **config)  # type: ignore[arg-type]
        async with DualVLLMCoordinator(cfg) as coord:
            outs = await coord.generate_batch(QUESTIONS[:6], max_tokens=12, show_progress=False)
            stats = coord.get_statistics()
        assert stats["errors"] == 0
        return [(o.token_ids, o.logq, o.logp_theta, o.logp_t) for o in outs]

    async def both(theta: str, teacher: str) -> tuple[list[tuple], list[tuple]]:
        clean = await run(theta, teacher)
        port = int(theta.rsplit(":", 1)[1])
        async with raw_server(duplicating_proxy(port, every=3)) as proxied:
            dirty = await run(proxied, teacher)
        return clean, dirty

    clean, dirty = asyncio.run(both(*(sglang_pair if flavor == "sglang" else generate_pair)))
    assert dirty == clean


# ------------------------------------------------------------ proxies
def counting_proxy(seen: list[bytes]) -> Handler:
    """A forward proxy for plain http: absolute-form requests, forwarded as they are."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            seen.append(head.split(b"\r\n", 1)[0])
            target = head.split(b" ", 2)[1].decode()  # http://host:port/path
            hostport = target.split("/", 3)[2]
            host, port = hostport.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            up_writer.write(head.replace(target.encode(), b"/" + target.split("/", 3)[3].encode(), 1) + body)
            await up_writer.drain()
            writer.write(await read_reply(up_reader))
            await writer.drain()
            up_writer.close()

    return handle


@pytest.mark.parametrize(
    ("env", "flags", "through_proxy"),
    [
        ({"HTTP_PROXY": "{proxy}"}, {}, True),
        ({"http_proxy": "{proxy}"}, {}, True),
        ({"HTTP_PROXY": "{proxy}"}, {"trust_env": False}, False),
        ({"HTTP_PROXY": "{proxy}", "NO_PROXY": "127.0.0.1"}, {}, False),
    ],
    ids=["HTTP_PROXY", "http_proxy", "ignored when asked", "NO_PROXY"],
)
def test_proxies_come_from_the_environment(
    env: dict[str, str], flags: dict, through_proxy: bool, monkeypatch: pytest.MonkeyPatch, urls: tuple[str, str]
) -> None:
    seen: list[bytes] = []
    for name in ("HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def go(server: str) -> list[int]:
        async with raw_server(counting_proxy(seen)) as proxy:
            for name, value in env.items():
                monkeypatch.setenv(name, value.format(proxy=proxy))
            c = VLLMClient(server, max_retries=0, **flags)
            try:
                return await c.tokenize("Hello")
            finally:
                await c.aclose()

    ids = asyncio.run(go(urls[0]))
    assert ids
    assert bool(seen) == through_proxy
    if through_proxy:
        assert seen[0].startswith(b"POST http://127.0.0.1:")


# ------------------------------------------------------------ TLS
@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


@contextlib.contextmanager
def tls_server(cert: Path, key: Path) -> Iterator[str]:
    import ssl
    import threading

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    ready: list[str] = []
    loop = asyncio.new_event_loop()

    async def start() -> asyncio.Server:
        server = await asyncio.start_server(answering(OK), "127.0.0.1", 0, ssl=ctx)
        ready.append(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        return server

    server = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        server.close()
        loop.run_until_complete(server.wait_closed())
        loop.close()


def tls_call(url: str, **client: object) -> tuple[object, float, VLLMClient]:
    return asyncio.run(tokenize_once(url, max_retries=3, retry_delay=0.5, timeout=5, **client))


def test_a_self_signed_certificate_fails_at_once_with_the_way_out(certificate: tuple[Path, Path]) -> None:
    with tls_server(*certificate) as url:
        result, took, c = tls_call(url)
    assert isinstance(result, CertificateError), result
    assert "--ca-bundle" in str(result) and "--insecure" in str(result)
    assert c.stats.retries == 0 and took < 2


def test_a_ca_bundle_or_ssl_cert_file_verifies_it(
    certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, _ = certificate
    with tls_server(*certificate) as url:
        assert tls_call(url, ca_bundle=str(cert))[0] == [1, 2]
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        assert tls_call(url)[0] == [1, 2]


def test_insecure_skips_verification_with_a_warning(certificate: tuple[Path, Path]) -> None:
    with tls_server(*certificate) as url, pytest.warns(UserWarning, match="not verified"):
        assert tls_call(url, insecure=True)[0] == [1, 2]


def test_cli_flags_reach_the_client(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 1)
    cert, _ = certificate
    with tls_server(*certificate) as url:
        code, err = wait_cli(generate_cli((url, url), inp, out, "--max-retries", "0"))
        assert code == 2 and "--ca-bundle" in err, err
        # verified now: the next failure is the fake server's, not TLS
        code, err = wait_cli(generate_cli((url, url), inp, out, "--max-retries", "0", "--ca-bundle", str(cert)))
        assert "certificate" not in err, err
    code, err = wait_cli(generate_cli((url, url), inp, out, "--ca-bundle", str(tmp_path / "nope.pem")))
    assert code == 2 and "ca_bundle" in err


def test_a_tokenize_reply_of_the_wrong_shape_is_a_clear_error() -> None:
    body = b'{"foo": 1}'
    reply = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    result, _ = tokenize_against(answering(reply))
    assert isinstance(result, IncompleteReplyError) and "without a list of token ids" in str(result)


# ------------------------------------------------------------ the lean path for plain http
def counting(handler: Handler, opened: list[int]) -> Handler:
    """`handler`, counting the connections it is given."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(1)
        await handler(reader, writer)

    return handle


def calls_against(handler: Handler, calls: int, **client: object) -> list[object]:
    """`calls` /tokenize calls in turn on one client against a raw server: each result or error."""

    async def go() -> list[object]:
        async with raw_server(handler) as url:
            c = VLLMClient(url, max_retries=0, timeout=3.0, **client)  # type: ignore[arg-type]
            got: list[object] = []
            for _ in range(calls):
                try:
                    got.append(await c.tokenize("x"))
                except Exception as err:
                    got.append(err)
            await c.aclose()
            return got

    return asyncio.run(go())


def test_plain_http_keeps_one_connection_alive_and_says_who_asks() -> None:
    opened: list[int] = []
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await read_request(reader)
            heads.append(head)
            writer.write(OK)
            await writer.drain()

    assert calls_against(counting(handle, opened), 20) == [[1, 2]] * 20
    assert len(opened) == 1
    assert all(b"User-Agent: dualsample_rs/" in h and b"X-Request-Id: " in h for h in heads)


def test_a_body_that_runs_to_the_end_of_the_stream_is_read_whole_and_its_connection_not_reused() -> None:
    opened: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_BODY)
        await writer.drain()
        writer.close()

    assert calls_against(counting(handle, opened), 3) == [[1, 2]] * 3
    assert len(opened) == 3


def test_a_connection_the_server_closes_while_idle_is_not_used_again() -> None:
    """One reply per connection, each kept alive by its headers and then closed a moment
    later: every next request opens a new connection, with no error and no retry."""
    opened: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK)
        await writer.drain()

    async def go() -> list[object]:
        async with raw_server(counting(handle, opened)) as url:
            c = VLLMClient(url, max_retries=0, timeout=3.0)
            got: list[object] = []
            for _ in range(4):
                got.append(await c.tokenize("x"))
                await asyncio.sleep(0.05)  # the server has closed it by now
            await c.aclose()
            return got

    assert asyncio.run(go()) == [[1, 2]] * 4
    assert len(opened) == 4


def test_bytes_after_a_whole_reply_close_the_connection() -> None:
    """A reply followed by stray bytes (in the same packet or later) answers its request,
    and the connection is not used for the next one."""
    opened: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_request(reader)
            writer.write(OK + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    assert calls_against(counting(handle, opened), 3) == [[1, 2]] * 3
    assert len(opened) == 3


def test_a_cancelled_request_drops_its_connection_and_the_next_one_is_answered() -> None:
    opened: list[int] = []
    first = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if not first.is_set():  # the first request is never answered
            first.set()
            await asyncio.sleep(30)
        writer.write(OK)
        await writer.drain()

    async def go() -> object:
        async with raw_server(counting(handle, opened)) as url:
            c = VLLMClient(url, max_retries=0, timeout=5.0)
            task = asyncio.ensure_future(c.tokenize("x"))
            await first.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            got = await c.tokenize("x")
            await c.aclose()
            return got

    assert asyncio.run(go()) == [1, 2]
    assert len(opened) == 2


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
def test_a_compressed_body_is_inflated(coding: str) -> None:
    import zlib

    packer = zlib.compressobj(wbits=31 if coding == "gzip" else 15)
    packed = packer.compress(OK_BODY) + packer.flush()
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: %s\r\nContent-Length: %d\r\n\r\n%s" % (
        coding.encode(), len(packed), packed)  # fmt: skip
    assert calls_against(answering(reply), 2) == [[1, 2]] * 2


def test_an_api_key_with_a_line_break_is_refused_naming_it() -> None:
    with pytest.raises(InvalidInputError, match="api_key"):
        VLLMClient("http://127.0.0.1:9", api_key="key\r\nX-Injected: 1")


def test_the_client_gives_the_same_records_under_uvloop(urls: tuple[str, str]) -> None:
    """uvloop (which Ray and the engines' servers run) gives transports that are not
    asyncio's classes: the lean path must not depend on them."""
    uvloop = pytest.importorskip("uvloop")

    async def run() -> list[tuple]:
        cfg = CoordinatorConfig(theta_url=urls[0], t_url=urls[1], seed=3, max_concurrency=4, max_batch_size=2)
        async with DualVLLMCoordinator(cfg) as coord:
            outs = await coord.generate_batch(QUESTIONS[:5], max_tokens=8, show_progress=False)
        return [(o.token_ids, o.logq, o.logp_theta, o.logp_t, o.generated_text) for o in outs]

    assert uvloop.run(run()) == asyncio.run(run())


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("first", [b"", b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"],  # noqa: E501
                         ids=["closes at once", "answers 503 and closes"])  # fmt: skip
def test_a_server_that_closes_on_accept_fails_the_request_at_once(loop: str, first: bytes) -> None:
    """As a port proxy does while the server behind it starts: an error at once (retried
    as any connection error), never a wait for the deadline nor a raw RuntimeError."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(first)
        await writer.drain()

    async def go() -> list[tuple[object, float]]:
        async with raw_server(handle) as url:
            return [(await tokenize_once(url, max_retries=0, timeout=3.0))[:2] for _ in range(3)]

    run = pytest.importorskip("uvloop").run if loop == "uvloop" else asyncio.run
    for result, took in run(go()):
        assert isinstance(result, APIError) and not isinstance(result, APITimeoutError), result
        assert took < 1.5


def test_a_client_used_in_one_event_loop_closes_in_another(urls: tuple[str, str]) -> None:
    import gc
    import warnings

    client = VLLMClient(urls[0])
    assert asyncio.run(client.tokenize("x"))
    asyncio.run(client.aclose())  # its connections' loop is gone: nothing to raise
    # Their sockets close when collected (nothing else can close them without their
    # loop), with the ResourceWarning asyncio gives any transport left so: collected
    # here, so that the warning does not land in another test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del client
        gc.collect()


def test_a_204_keeps_the_connection() -> None:
    opened: list[int] = []
    answers = [b"HTTP/1.1 204 No Content\r\n\r\n", OK]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers * 2:
            await read_request(reader)
            writer.write(answer)
            await writer.drain()

    got = calls_against(counting(handle, opened), 4)
    assert [r for r in got if r == [1, 2]] == [[1, 2]] * 2
    assert len(opened) == 1


def test_reply_headers_past_the_limit_are_refused_at_once() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        for _ in range(1024):  # 64 MiB of one header, if it were all read
            writer.write(b"a" * 65536)
            await writer.drain()

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result, took = tokenize_against(handle, timeout=20.0)
    assert isinstance(result, APIConnectionError) and "headers are over" in str(result), result
    assert took < 2.5
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024 < 100


def test_a_compressed_body_cut_short_is_an_error() -> None:
    import zlib

    packer = zlib.compressobj()
    packed = (packer.compress(OK_BODY) + packer.flush())[:-4]
    reply = b"HTTP/1.1 200 OK\r\nContent-Encoding: deflate\r\n\r\n" + packed

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)  # the body runs to the end of the stream, which comes early
        await writer.drain()

    result, _ = tokenize_against(handle)
    assert isinstance(result, APIConnectionError) and "end mark" in str(result), result


def test_a_name_with_a_dead_address_first_reaches_the_next_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Happy eyeballs: a name whose first address drops connections (a full backlog on
    127.0.0.2) and whose second serves is reached in about a quarter second, not after
    the connect timeout."""
    import socket

    async def go() -> tuple[object, float]:
        async with raw_server(answering(OK)) as url:
            port = int(url.rsplit(":", 1)[1])
            dead = socket.socket()
            dead.bind(("127.0.0.2", port))
            dead.listen(0)
            fillers = []
            for _ in range(3):  # fill the backlog, so that further SYNs are dropped
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.2", port))
                fillers.append(s)
            loop = asyncio.get_running_loop()
            real = loop.getaddrinfo

            async def two_homes(host: str, *args: object, **kwargs: object) -> list:
                if host != "twohomes.test":
                    return await real(host, *args, **kwargs)  # type: ignore[arg-type]
                return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in ("127.0.0.2", "127.0.0.1")]

            monkeypatch.setattr(loop, "getaddrinfo", two_homes)
            try:
                result, took, _ = await tokenize_once(f"http://twohomes.test:{port}", max_retries=0,
                                                      timeout=30.0, connect_timeout=5.0)  # fmt: skip
            finally:
                for s in [dead, *fillers]:
                    s.close()
            return result, took

    result, took = asyncio.run(go())
    assert result == [1, 2]
    assert took < 3


def test_a_pool_of_no_connections_is_refused_naming_it() -> None:
    with pytest.raises(InvalidInputError, match="connection_pool_size"):
        VLLMClient("http://127.0.0.1:9", connection_pool_size=0)


def test_an_api_key_beyond_ascii_is_sent_as_utf8_as_aiohttp_sent_it() -> None:
    heads: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        heads.append(head)
        writer.write(OK)
        await writer.drain()

    assert calls_against(handle, 1, api_key="sk-abc\u00a0") == [[1, 2]]
    assert b"Authorization: Bearer sk-abc\xc2\xa0\r\n" in heads[0]


def test_a_connection_made_while_the_client_closes_is_closed_and_its_request_fails() -> None:
    """The name is resolved slowly; the client is closed meanwhile: the connection that
    then opens is closed at once (the server sees its end) and the request fails."""
    ended: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client's end
        ended.append(1)

    async def go() -> object:
        async with raw_server(handle) as url:
            loop = asyncio.get_running_loop()
            real = loop.getaddrinfo

            async def slow(*args: object, **kwargs: object) -> list:
                await asyncio.sleep(0.2)
                return await real(*args, **kwargs)  # type: ignore[arg-type]

            loop.getaddrinfo = slow  # type: ignore[method-assign]
            c = VLLMClient(url, max_retries=0, timeout=3.0)
            task = asyncio.ensure_future(c.tokenize("x"))
            await asyncio.sleep(0.05)
            await c.aclose()
            try:
                result: object = await task
            except Exception as err:
                result = err
            for _ in range(100):
                if ended:
                    break
                await asyncio.sleep(0.01)
            return result

    result = asyncio.run(go())
    assert isinstance(result, APIConnectionError) and "closed" in str(result), result
    assert ended == [1]


def test_an_api_key_utf8_cannot_carry_is_refused_naming_it() -> None:
    with pytest.raises(InvalidInputError, match="api_key"):
        VLLMClient("http://127.0.0.1:9", api_key="sk-\ud800")


def test_a_write_refused_by_a_closed_transport_is_a_reply_error() -> None:
    """uvloop's transport raises RuntimeError on a write once closed under us, where
    asyncio's drops the bytes: the request fails at once as a connection error would,
    and the connection holds no request."""

    class ClosedUnderUs(asyncio.Transport):
        def is_closing(self) -> bool:
            return False

        def write(self, data: bytes | bytearray | memoryview) -> None:
            raise RuntimeError("unable to perform operation on <TCPTransport closed=True>; the handler is closed")

    async def send() -> _Connection:
        conn = _Connection(1024, lambda seen: ReplyTooLargeError(seen))
        conn.connection_made(ClosedUnderUs())
        with pytest.raises(ReplyError, match="closed before the request was sent: unable to perform"):
            await asyncio.wait_for(conn.send(b"GET / HTTP/1.1\r\n\r\n"), timeout=5)
        return conn

    assert asyncio.run(send())._waiter is None
