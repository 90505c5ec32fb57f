"""Servers in their wire dialects, behind one protocol (:class:`Backend`).

- ``vllm-completions``: vLLM's ``/v1/completions``, many contexts per request.
- ``vllm-generate``: vLLM's tokens-in/out ``/inference/v1/generate`` (``--enable-scale-out``).
- ``sglang``: SGLang's native ``/generate``.
"""

from __future__ import annotations

from typing import Any, Literal

from ..exceptions import APIError, ConfigurationError
from .base import Backend, Positions, TopK
from .context import Context
from .http import HttpBackend, RequestStats
from .sglang import SGLangBackend
from .vllm_completions import VLLMCompletionsBackend
from .vllm_generate import VLLMGenerateBackend

Dialect = Literal["auto", "vllm-completions", "vllm-generate", "sglang"]
DIALECTS: dict[str, type[HttpBackend]] = {
    "vllm-completions": VLLMCompletionsBackend,
    "vllm-generate": VLLMGenerateBackend,
    "sglang": SGLangBackend,
}


async def detect_dialect(http: HttpBackend) -> str:
    """The dialect a server speaks: SGLang lists its models as ``owned_by: "sglang"``
    and answers ``/model_info`` (``/get_model_info`` before 0.5, deprecated since);
    anything else is taken for vLLM, whose batched completions route is the default
    there."""
    cards = await http.models()
    owners = {str(c.get("owned_by", "")).lower() for c in cards}
    if "sglang" in owners:
        return "sglang"
    if "vllm" in owners:
        return "vllm-completions"
    for path in ("/model_info", "/get_model_info"):
        try:
            await http.get_json(path, probe=True)
        except APIError:
            continue
        return "sglang"
    return "vllm-completions"


def backend_for(dialect: str, http: HttpBackend) -> Backend:
    """A backend of `dialect` sharing `http`'s connections, settings and counters."""
    cls = DIALECTS.get(dialect)
    if cls is None:
        raise ConfigurationError(f"dialect: expected one of {sorted(DIALECTS)} or 'auto', got {dialect!r}")
    backend: Any = object.__new__(cls)
    backend.__dict__.update(http.__dict__)
    return backend


__all__ = [
    "DIALECTS",
    "Backend",
    "Context",
    "Dialect",
    "HttpBackend",
    "Positions",
    "RequestStats",
    "SGLangBackend",
    "TopK",
    "VLLMCompletionsBackend",
    "VLLMGenerateBackend",
    "backend_for",
    "detect_dialect",
]
