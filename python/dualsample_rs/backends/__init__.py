"""Servers in their wire dialects, behind one protocol (:class:`Backend`).

- ``vllm-completions``: vLLM's ``/v1/completions``, many contexts per request.
- ``vllm-generate``: vLLM's tokens-in/out ``/inference/v1/generate`` (``--enable-scale-out``).
- ``sglang``: SGLang's native ``/generate``.
"""

from __future__ import annotations

from .base import Backend, Positions, TopK
from .context import Context
from .detect import DIALECTS, Dialect, DialectBackend, backend_for, detect_dialect, open_backend
from .facts import ModelCard, TokenizerFacts
from .http import Connection, HttpBackend, RequestStats
from .sglang import SGLangBackend
from .vllm_completions import VLLMCompletionsBackend
from .vllm_generate import VLLMGenerateBackend

__all__ = [
    "DIALECTS",
    "Backend",
    "Connection",
    "Context",
    "Dialect",
    "DialectBackend",
    "HttpBackend",
    "ModelCard",
    "Positions",
    "RequestStats",
    "SGLangBackend",
    "TokenizerFacts",
    "TopK",
    "VLLMCompletionsBackend",
    "VLLMGenerateBackend",
    "backend_for",
    "detect_dialect",
    "open_backend",
]
