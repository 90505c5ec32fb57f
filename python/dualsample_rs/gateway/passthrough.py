"""Routes the gateway forwards to the base servers: the engines' weight-sync, cache and
pause routes (to every base replica) and the informational ones (to the first)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .metrics import GatewayMetrics

__all__ = ["ENGINE_ROUTES", "FIRST_REPLICA_ROUTES", "Forwarder", "Reply"]

# Read from the engines' sources (docs/gateway-clients.md): vLLM's dev-mode and RL routes,
# SGLang's http_server routes.
VLLM_ROUTES = (
    "/sleep", "/wake_up", "/is_sleeping", "/reset_prefix_cache", "/reset_mm_cache", "/reset_encoder_cache",
    "/collective_rpc", "/pause", "/resume", "/is_paused", "/abort_requests", "/init_weight_transfer_engine",
    "/start_weight_update", "/update_weights", "/finish_weight_update", "/update_weight_version", "/weight_info",
    "/get_world_size", "/v1/load_lora_adapter", "/v1/unload_lora_adapter",
)  # fmt: skip
SGLANG_ROUTES = (
    "/update_weights_from_disk", "/update_weights_from_distributed", "/update_weights_from_tensor",
    "/update_weights_from_ipc", "/init_weights_update_group", "/destroy_weights_update_group",
    "/get_weight_version", "/flush_cache", "/pause_generation", "/continue_generation",
    "/release_memory_occupation", "/resume_memory_occupation", "/abort_request", "/load_lora_adapter",
    "/unload_lora_adapter",
)  # fmt: skip
ENGINE_ROUTES = tuple(dict.fromkeys((*VLLM_ROUTES, *SGLANG_ROUTES, "/health")))
# Answered by the first base replica alone.
FIRST_REPLICA_ROUTES = (
    "/v1/models", "/tokenize", "/detokenize", "/v1/tokenize", "/v1/detokenize", "/version", "/get_model_info",
    "/model_info", "/server_info", "/get_server_info", "/health_generate",
)  # fmt: skip

# Headers not to copy across a proxy hop.
_HOP = {"host", "content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te", "trailer",
        "proxy-authorization", "proxy-authenticate", "content-encoding", "accept-encoding"}  # fmt: skip


@dataclass(frozen=True)
class Reply:
    """One server's answer (status 0: it could not be reached)."""

    url: str
    status: int
    body: bytes
    content_type: str | None

    def response(self) -> web.Response:
        headers = {"Content-Type": self.content_type} if self.content_type else None
        return web.Response(status=self.status, body=self.body, headers=headers)


class Forwarder:
    """Sends a client's request on to base servers, unchanged (method, path, query,
    headers, body)."""

    def __init__(self, base_urls: Sequence[str], metrics: GatewayMetrics, timeout: float) -> None:
        self.base_urls = [u.rstrip("/") for u in base_urls]
        self.metrics = metrics
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def one(self, base: str, request: web.Request, body: bytes) -> Reply:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        url = base + request.rel_url.path_qs
        start = time.perf_counter()
        try:
            async with self.session().request(request.method, url, data=body or None, headers=headers) as resp:
                payload = await resp.read()
                reply = Reply(base, resp.status, payload, resp.headers.get("Content-Type"))
        except (aiohttp.ClientError, asyncio.TimeoutError) as err:
            reply = Reply(base, 0, str(err).encode() or type(err).__name__.encode(), None)
        self.metrics.observe_upstream(base, time.perf_counter() - start, reply.status == 0 or reply.status >= 500)
        return reply

    async def every(self, request: web.Request) -> list[Reply]:
        """The request sent to every base replica at once; their replies in order."""
        body = await request.read()
        return list(await asyncio.gather(*(self.one(b, request, body) for b in self.base_urls)))

    async def first(self, request: web.Request) -> Reply:
        """The request sent to the first base replica."""
        return await self.one(self.base_urls[0], request, await request.read())
