"""Errors the reference server answers with, in vLLM's body shape."""

from __future__ import annotations

from typing import Any


class APIError(Exception):
    """An error answered with the engine's error body (see `body`)."""

    def __init__(self, status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param

    def body(self, flavor: str = "vllm") -> dict[str, Any]:
        """vLLM's ``{"error": {...}}``, or SGLang's flat ``{"object": "error", ...}``."""
        fields = {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        if flavor == "sglang":
            return {"object": "error", **fields}
        return {"error": fields}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, "BadRequestError", param)


def valid_text(value: str, param: str) -> str:
    """`value` if it can be encoded as UTF-8 (a lone surrogate from a JSON escape cannot)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise bad_request(f"{param} is not valid Unicode: {err.reason} at position {err.start}", param) from None
    return value
