"""Running the gateway: a coordinator's serving run behind the HTTP application.

:func:`open_gateway` starts it in the running event loop and yields where it listens
(tests, embedding); :func:`serve` runs it until cancelled (``dualsample gateway``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

from aiohttp import web

from ..config.coordinator import CoordinatorConfig
from ..engine.coordinator import Coordinator
from ..engine.serving import Serving
from .app import GatewayOptions, make_app
from .engine_sampler import EngineSampler
from .metrics import GatewayMetrics

__all__ = ["PAUSE_PATHS", "RESUME_PATHS", "RunningGateway", "open_gateway", "serve"]

log = logging.getLogger("dualsample_rs.gateway")

# Control calls after which the gateway holds its rounds, and lets them go on.
PAUSE_PATHS = frozenset({"/pause", "/pause_generation", "/areal_pause_generation"})
RESUME_PATHS = frozenset({"/resume", "/continue_generation", "/areal_continue_generation"})


@dataclass
class RunningGateway:
    """A gateway that is listening.

    Attributes:
        url: its base URL, e.g. ``http://127.0.0.1:8000``.
        coordinator: the coordinator whose rounds draw the tokens.
        serving: its serving run.
        sampler: the engine sampler behind the routes.
        metrics: the gateway's metrics.
    """

    url: str
    coordinator: Coordinator
    serving: Serving
    sampler: EngineSampler
    metrics: GatewayMetrics


@contextlib.asynccontextmanager
async def open_gateway(
    config: CoordinatorConfig,
    host: str = "127.0.0.1",
    port: int = 0,
    passthrough_paths: Iterable[str] = (),
    *,
    options: GatewayOptions | None = None,
    teacher_system: str | None = None,
    max_queued_requests: int | None = None,
) -> AsyncIterator[RunningGateway]:
    """Start the servers' coordinator, its serving run and the HTTP application on
    `host`:`port` (0: a free port); yield where it listens; stop all on exit.

    Args:
        config: the run's settings, as ``dualsample generate`` takes them.
        passthrough_paths: more paths forwarded to every base replica (any method).
        options: the HTTP layer's settings (its ``flavor`` follows the base's dialect
            and ``model_name`` the base's model where they are None).
        teacher_system: a system message only the teacher sees (chat requests).
        max_queued_requests: overrides the options' queue limit.
    """
    metrics = GatewayMetrics()
    async with Coordinator(config) as coord, coord.serving() as serving:
        assert coord.info is not None
        sampler = EngineSampler(coord, serving, teacher_system, metrics)
        options = options or GatewayOptions()
        sglang = coord.info[0].dialect == "sglang"
        options = dataclasses.replace(options, flavor=options.flavor or ("sglang" if sglang else "vllm"),
                                      model_name=options.model_name or coord.base.model or "dualsample")  # fmt: skip
        if max_queued_requests is not None:
            options = dataclasses.replace(options, max_queued_requests=max_queued_requests)

        # Every call to every server (each attempt), timed and counted per server.
        for replicas in (coord.base, *(lane.replicas for lane in coord.lanes.values())):
            for backend in replicas.replicas:
                backend.stats.observer = functools.partial(metrics.observe_upstream, backend.base_url)

        def forwarded(path: str) -> None:
            if path in PAUSE_PATHS:
                log.info("gateway: %s passed to the base; rounds wait", path)
                serving.pause()
            elif path in RESUME_PATHS:
                log.info("gateway: %s passed to the base; rounds go on", path)
                serving.resume()

        app = make_app(sampler, config.servers[0].urls, passthrough_paths, options=options, metrics=metrics,
                       on_forwarded=forwarded)  # fmt: skip
        # A client that leaves cancels its handler, which drops its sequences.
        runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True)
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else port
            shown = f"[{host}]" if ":" in host else host
            yield RunningGateway(f"http://{shown}:{bound}", coord, serving, sampler, metrics)
        finally:
            await runner.cleanup()


async def serve(
    config: CoordinatorConfig,
    host: str = "127.0.0.1",
    port: int = 8000,
    passthrough_paths: Iterable[str] = (),
    *,
    options: GatewayOptions | None = None,
    teacher_system: str | None = None,
    max_queued_requests: int | None = None,
) -> None:
    """Serve the gateway until cancelled (see :func:`open_gateway`)."""
    async with open_gateway(config, host, port, passthrough_paths, options=options, teacher_system=teacher_system,
                            max_queued_requests=max_queued_requests) as gw:  # fmt: skip
        print(f"dualsample gateway: listening on {gw.url}", flush=True)
        await asyncio.Event().wait()
