"""The HTTP client's own CPU cost per request, side by side with the alternatives.

The same small POST (a ``/tokenize`` of one sentence) to one reference server on
loopback, 1 and 64 requests in flight, from: this package's client (`HttpBackend`, on
aiohttp), the package's earlier hand-written HTTP/1.1 client (with ``make previous``, see
`previous`), aiohttp itself, httpx with its own connection pool, and httpx over an
aiohttp transport (the route openai-python offers). ``extra_info`` has the client
process's CPU µs per request; the server runs in another process, so its time is not
counted.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator

import aiohttp
import httpx
import previous
import pytest
from dualsample_rs import VLLMCompletionsBackend
from dualsample_rs.server import running_server
from httpx_aiohttp import AiohttpTransport

REQUESTS = 1000
BODY = json.dumps({"prompt": "Hello world, this is a test"}).encode()
HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with running_server("base") as u:
        yield u


def _timed(
    make: Callable[[str], Awaitable[tuple[Callable[[], Awaitable[None]], Callable[[], Awaitable[None]]]]],
    in_flight: int,
):
    def run(url: str) -> float:
        async def go() -> float:
            one, close = await make(url)
            sem = asyncio.Semaphore(in_flight)

            async def limited() -> None:
                async with sem:
                    await one()

            await asyncio.gather(*(limited() for _ in range(50)))  # warm the connections
            t0 = time.process_time()
            await asyncio.gather(*(limited() for _ in range(REQUESTS)))
            cpu = time.process_time() - t0
            await close()
            return cpu

        return asyncio.run(go())

    return run


async def _make_ours(url: str):
    backend = VLLMCompletionsBackend(url, max_retries=0)

    async def one() -> None:
        await backend.tokenize("Hello world, this is a test")

    return one, backend.aclose


async def _make_previous(url: str):
    backend = previous.require().VLLMCompletionsBackend(url, max_retries=0)

    async def one() -> None:
        await backend.tokenize("Hello world, this is a test")

    return one, backend.aclose


async def _make_aiohttp(url: str):
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100))

    async def one() -> None:
        async with session.post(url + "/tokenize", data=BODY, headers=HEADERS) as r:
            json.loads(await r.read())

    return one, session.close


def _make_httpx(transport: Callable[[], httpx.AsyncBaseTransport] | None):
    async def make(url: str):
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=100)
        client = httpx.AsyncClient(transport=transport() if transport else None, limits=limits)

        async def one() -> None:
            r = await client.post(url + "/tokenize", content=BODY, headers=HEADERS)
            json.loads(r.content)

        return one, client.aclose

    return make


CLIENTS = {
    "dualsample_rs": _make_ours,
    "dualsample_rs previous (own HTTP/1.1)": _make_previous,
    "aiohttp": _make_aiohttp,
    "httpx": _make_httpx(None),
    "httpx over aiohttp": _make_httpx(AiohttpTransport),
}


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("in_flight", [1, 64])
def test_client_cpu_per_request(benchmark, url: str, client: str, in_flight: int) -> None:
    benchmark.group = f"HTTP client CPU per request, {in_flight} in flight, loopback"
    if "previous" in client:
        previous.require()
    run = _timed(CLIENTS[client], in_flight)
    cpu: list[float] = []
    benchmark.pedantic(lambda: cpu.append(run(url)), rounds=2, iterations=1)
    benchmark.extra_info["cpu_us_per_request"] = 1e6 * min(cpu) / REQUESTS
