"""Start-up of a model: connections to its replicas, the handshake with each, and the
checks that they serve one model; what the coordinator's `start` builds its lanes from."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from ..backends import Backend, Connection, DialectBackend, backend_for, open_backend
from ..backends.replicas import ReplicaSet
from ..config.coordinator import ServerSettings, TransportSettings
from ..exceptions import APIConnectionError, ConfigurationError, InternalServerError
from .handshake import ServerInfo, agree, handshake

log = logging.getLogger("dualsample_rs")


def open_connections(server: ServerSettings, transport: TransportSettings) -> list[Connection]:
    """One connection per replica of a model, opened now (a bad URL fails here)."""
    options = transport.connection_options()
    return [Connection.open(url, api_key=server.api_key, options=options) for url in server.urls]


async def start_model(
    connections: list[Connection], server: ServerSettings, top_k: int, retries: int, scored: int
) -> tuple[ReplicaSet, ServerInfo]:
    """Handshake with every replica of one model; those that answer must serve the
        same model, dialect and vocabulary. A replica that cannot be reached is left out
        of rotation with a warning, and probed until it passes the same checks; only
        when none answers does start-up fail. Returns the replicas in their dialect, and
        what they serve. `retries`: per start-up request, whatever the run's; `top_k` and
    `scored`: the log probabilities each request will ask for, checked against the cap."""

    async def first(conn: Connection) -> tuple[DialectBackend, ServerInfo]:
        backend = await open_backend(conn, server.dialect, detect_retries=retries)
        return backend, await handshake(backend.with_options(max_retries=retries), server.model_name, top_k, scored)

    found = await asyncio.gather(*(first(conn) for conn in connections), return_exceptions=True)
    answered: list[tuple[DialectBackend, ServerInfo]] = []
    failed: list[tuple[int, BaseException]] = []
    for i, got in enumerate(found):
        if not isinstance(got, BaseException):
            answered.append(got)
        elif unreachable(got):
            failed.append((i, got))
        else:
            raise got
    if not answered:
        raise failed[0][1]
    info = answered[0][1]
    for _, other in answered[1:]:
        if (other.model, other.dialect) != (info.model, info.dialect):
            raise ConfigurationError(
                f"replicas of one model must serve the same model in the same dialect: {info.url} serves "
                f"{info.model!r} ({info.dialect}), {other.url} serves {other.model!r} ({other.dialect})"
            )
        agree(info, other)
    # A replica that did not answer speaks the dialect of those that did.
    backends: list[DialectBackend] = [
        got[0] if not isinstance(got, BaseException) else backend_for(info.dialect, conn)
        for got, conn in zip(found, connections, strict=True)
    ]
    for backend in backends:
        backend.model = info.model

    async def probe(backend: Backend) -> tuple[object, ...]:
        return fingerprint(await handshake(backend, server.model_name, top_k, scored))

    ready = ReplicaSet(backends, probe=probe)
    for i, got in enumerate(found):
        ready.expect(i, fingerprint(got[1] if not isinstance(got, BaseException) else info))
    for i, err in failed:
        log.warning("replica %s does not answer (%s); starting without it", backends[i].base_url, err)
        ready.start_down(i, err)
    shortest = min(other.max_model_len for _, other in answered)
    return ready, dataclasses.replace(info, max_model_len=shortest)


def fingerprint(info: ServerInfo) -> tuple[object, ...]:
    """What must not change when a replica out of rotation comes back: everything the
    handshake found but its URL."""
    return (
        info.model,
        info.dialect,
        info.max_model_len,
        info.probe_ids,
        sorted(info.special_ids.items()),
        info.eos_ids,
    )


def unreachable(err: BaseException) -> bool:
    """A start-up failure that says the replica is down, not that it is misconfigured."""
    return isinstance(err, (APIConnectionError, InternalServerError))
