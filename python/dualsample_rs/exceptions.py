"""Exceptions raised by dualsample_rs.

Every error the package raises derives from :class:`DualSampleError`. Bad input raises
:class:`InvalidInputError`, which is also a :class:`ValueError`, so ``except ValueError``
keeps working; an array of a dtype that cannot be converted safely raises
:class:`InvalidDtypeError`, which is also a :class:`TypeError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "CertificateError",
    "ConfigurationError",
    "DualSampleError",
    "IncompleteReplyError",
    "InternalServerError",
    "InvalidDtypeError",
    "InvalidInputError",
    "InvalidResponseError",
    "LogprobsLimitError",
    "MismatchedReplyError",
    "NotFoundError",
    "RateLimitError",
    "ReplyTooLargeError",
    "Response",
    "ServiceUnavailableError",
]


@dataclass(frozen=True)
class Response:
    """A server's answer, as much of it as errors and retry decisions need."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes
    method: str
    url: str


class DualSampleError(Exception):
    """Base class of every error dualsample_rs raises."""


class InvalidInputError(DualSampleError, ValueError):
    """An argument is out of range or malformed; the message names it and, where it
    concerns one, the row."""


class InvalidDtypeError(InvalidInputError, TypeError):
    """An array has a dtype that cannot be converted safely to the one expected."""


class ConfigurationError(InvalidInputError):
    """The coordinator cannot run with this configuration or these servers (the top-k
    above the server's cap, servers with different vocabularies, ...)."""


class APIError(DualSampleError):
    """A call to a server failed.

    Attributes:
        request: the request that failed, as ``(method, url)``.
        message: what went wrong.
        body: the decoded error body, when there was one.
    """

    def __init__(self, message: str, request: tuple[str, str] | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body


class APIConnectionError(APIError):
    """The server could not be reached, or the connection broke mid-response."""


class APITimeoutError(APIConnectionError):
    """The request timed out."""


class CertificateError(APIConnectionError):
    """The server's TLS certificate did not verify (not retried: it will not change)."""


class InvalidResponseError(APIError):
    """The server answered 2xx with a body that is not the expected JSON."""


class IncompleteReplyError(InvalidResponseError):
    """A well-formed reply that lacks what the request asked for (a field, a position,
    a scored id): failed at once with the reason, since asking again gets the same."""


class MismatchedReplyError(InvalidResponseError):
    """A reply that answers another request (its id or prompt token count is not the
    request's): a stray or duplicated reply on a kept-alive connection. It is never
    used as data; the connections are dropped and the request is sent again."""


class ReplyTooLargeError(APIError):
    """A reply larger than the configured cap (``max_reply_bytes``, ``--max-reply-mb``)."""


class APIStatusError(APIError):
    """The server answered with an error status.

    Attributes:
        response: the response.
        status_code: its HTTP status.
    """

    def __init__(self, message: str, response: Response, body: Any = None) -> None:
        super().__init__(message, (response.method, response.url), body)
        self.response = response
        self.status_code = response.status_code


class BadRequestError(APIStatusError):
    """400."""


class LogprobsLimitError(BadRequestError):
    """400 for asking more log probabilities per position than the server returns
    (vLLM's ``--max-logprobs``), as the dialect's backend read the error body."""


class AuthenticationError(APIStatusError):
    """401."""


class NotFoundError(APIStatusError):
    """404."""


class RateLimitError(APIStatusError):
    """429."""


class InternalServerError(APIStatusError):
    """500 and other 5xx without a class of their own."""


class ServiceUnavailableError(InternalServerError):
    """503."""


# The class of an error status without one of its own is chosen by `status_error`.
STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    404: NotFoundError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def status_error(
    response: Response, detail: str | None, body: Any = None, cls: type[APIStatusError] | None = None
) -> APIStatusError:
    """The exception for an error response: `detail` is the server's own message, as the
    backend of its dialect read it from `body` (None when it sent none); `cls` a class
    the dialect chose, else the status's."""
    message = f"HTTP {response.status_code} from {response.url}"
    if detail:
        message += f": {detail}"
    if cls is None:
        fallback = InternalServerError if response.status_code >= 500 else APIStatusError
        cls = STATUS_CLASSES.get(response.status_code, fallback)
    return cls(message, response, body)
