"""``dualsample gateway``: an HTTP endpoint that answers as vLLM or SGLang would, every
token drawn from q*.

This package holds the protocol layer: the routes' request parsing
(:mod:`.request`), their answers (:mod:`.response`), the application
(:func:`make_app`), and the boundary to the sampling engine (:class:`Sampler`).
"""

from .app import GENERATION_ROUTES, GatewayOptions, make_app
from .errors import GatewayError, RequestError, UpstreamError
from .metrics import GatewayMetrics
from .passthrough import ENGINE_ROUTES
from .request import Limits
from .sampler import ChoiceResult, Prompt, Sampler, SampleRequest, TokenResult

__all__ = [
    "ENGINE_ROUTES",
    "GENERATION_ROUTES",
    "ChoiceResult",
    "GatewayError",
    "GatewayMetrics",
    "GatewayOptions",
    "Limits",
    "Prompt",
    "RequestError",
    "SampleRequest",
    "Sampler",
    "TokenResult",
    "UpstreamError",
    "make_app",
]
