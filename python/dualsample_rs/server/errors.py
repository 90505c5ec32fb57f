"""Errors the reference server answers with, in vLLM's body shape."""

from __future__ import annotations

import json
from typing import Any


class APIError(Exception):
    """An error answered with the engine's error body (see `body`), with an HTTP status
    and extra response headers (e.g. ``Retry-After``)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "BadRequestError",
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.headers = headers or {}

    def body(self, flavor: str = "vllm") -> dict[str, Any]:
        """vLLM's ``{"error": {...}}``, SGLang's flat ``{"object": "error", ...}`` on its
        OpenAI routes, or SGLang's ``{"error": {"message": ...}}`` on its native ones
        (flavor ``sglang-native``)."""
        if flavor == "sglang-native":
            return {"error": {"message": self.message}}
        fields = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        if flavor == "sglang":
            return {"object": "error", **fields}
        return {"error": fields}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "BadRequestError", param)


def text_problem(value: str, param: str) -> str | None:
    """Why `value` cannot be encoded as UTF-8 (a lone surrogate from a JSON escape
    cannot), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        return f"{param} is not valid Unicode: {err.reason} at position {err.start}"
    return None


def valid_text(value: str, param: str) -> str:
    """`value` if it can be encoded as UTF-8, else a 400."""
    problem = text_problem(value, param)
    if problem is not None:
        raise bad_request(problem, param)
    return value


def load_json(raw: bytes) -> Any:
    """A request body decoded, or a ValueError saying why it cannot be (bad JSON, bad
    UTF-8, or nested past the decoder's depth)."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"JSON decode error: {err}") from None
    except RecursionError:
        raise ValueError("JSON decode error: nested too deeply") from None
