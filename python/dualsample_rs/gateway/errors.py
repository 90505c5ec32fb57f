"""Errors the gateway answers with, each in the body shape of the route's engine."""

from __future__ import annotations

from typing import Literal

from ..exceptions import DualSampleError
from ..server.errors import APIError

__all__ = ["ErrorShape", "GatewayError", "RequestError", "UpstreamError", "busy"]

# vLLM (and SGLang's OpenAI routes when the base is SGLang) answer the OpenAI routes;
# SGLang's native /generate answers its own `{"error": {"message": ...}}`.
ErrorShape = Literal["vllm", "sglang", "sglang-native"]


class GatewayError(DualSampleError, APIError):
    """An error answered to the client with an HTTP status and an engine-shaped body
    (:meth:`~dualsample_rs.server.errors.APIError.body`, with the shape of the route's
    engine).

    Attributes:
        status: the HTTP status.
        message: what went wrong (names the field at fault).
        type: the engine's error type, e.g. ``BadRequestError``.
        param: the field at fault, if one.
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        message: str,
        param: str | None = None,
        *,
        status: int = 400,
        type_: str = "BadRequestError",
        headers: dict[str, str] | None = None,
    ) -> None:
        APIError.__init__(self, status, message, type_, param, headers)


class RequestError(GatewayError):
    """A request the gateway refuses: a 400 naming the field."""


class UpstreamError(GatewayError):
    """A server (base or teacher) that stayed down past its retries: a 503 naming it."""

    def __init__(self, server: str, detail: str) -> None:
        super().__init__(f"Upstream server {server} is unavailable: {detail}", status=503,
                         type_="ServiceUnavailableError")  # fmt: skip
        self.server = server


def busy(retry_after: float) -> GatewayError:
    """The engines' overload answer (vLLM's wording), with ``Retry-After``."""
    return GatewayError(
        "The engine is currently busy and cannot accept new requests.",
        status=503,
        type_="ServiceUnavailableError",
        headers={"Retry-After": f"{max(1, round(retry_after))}"},
    )
