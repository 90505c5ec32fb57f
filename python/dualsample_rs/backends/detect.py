"""Detect, then build: which dialect a server speaks, and the backend of that dialect
on its connection.

Detection goes through a plain HTTP client on the same connection (its requests are
counted with the server's), which reads the error bodies of either engine, since it
does not know yet which one answers.
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

from ..exceptions import APIStatusError, ConfigurationError, Response, status_error
from .http import Connection, HttpBackend
from .sglang import SGLangBackend, sglang_error_message
from .vllm_completions import VLLMCompletionsBackend, vllm_error_message
from .vllm_generate import VLLMGenerateBackend

Dialect = Literal["auto", "vllm-completions", "vllm-generate", "sglang"]
#: A backend in one of the dialects (vllm-generate's class derives from vllm-completions').
DialectBackend: TypeAlias = VLLMCompletionsBackend | SGLangBackend
DIALECTS: dict[str, type[VLLMCompletionsBackend] | type[SGLangBackend]] = {
    "vllm-completions": VLLMCompletionsBackend,
    "vllm-generate": VLLMGenerateBackend,
    "sglang": SGLangBackend,
}


class _Prober(HttpBackend):
    """The client that detects: the engine is not known yet, so either's error body."""

    def read_error(self, response: Response, body: Any) -> APIStatusError:
        return status_error(response, vllm_error_message(body) or sglang_error_message(body), body)


async def detect_dialect(http: HttpBackend) -> str:
    """The dialect a server speaks: SGLang lists its models as ``owned_by: "sglang"``
    and answers ``/model_info`` (``/get_model_info`` before 0.5, deprecated since);
    anything else is taken for vLLM, whose batched completions route is the default
    there."""
    owners = {(card.owned_by or "").lower() for card in await http.models()}
    if "sglang" in owners:
        return "sglang"
    if "vllm" in owners:
        return "vllm-completions"
    for path in ("/model_info", "/get_model_info"):
        if await http.answers(path):
            return "sglang"
    return "vllm-completions"


def backend_for(dialect: str, connection: Connection) -> DialectBackend:
    """A backend of `dialect` on `connection` (its connections, counters and limits);
    closing it leaves them open.

    Raises:
        ConfigurationError: `dialect` is not one of `DIALECTS`.
    """
    cls = DIALECTS.get(dialect)
    if cls is None:
        raise ConfigurationError(f"dialect: expected one of {sorted(DIALECTS)} or 'auto', got {dialect!r}")
    return cls.on(connection)


async def open_backend(connection: Connection, dialect: str, *, detect_retries: int | None = None) -> DialectBackend:
    """The backend of `dialect` on `connection`, the dialect detected first when it is
    ``"auto"`` (with `detect_retries` retries per request, when given)."""
    if dialect == "auto":
        dialect = await detect_dialect(_Prober.on(connection, max_retries=detect_retries))
    return backend_for(dialect, connection)
