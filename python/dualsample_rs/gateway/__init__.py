"""``dualsample gateway``: an HTTP endpoint that answers as vLLM or SGLang would, every
token drawn from q*.

This package holds the protocol layer: the routes' request parsing
(:mod:`.request`), their answers (:mod:`.response`), the application
(:func:`make_app`), and the boundary to the sampling engine (:class:`Sampler`); the
sampler on the round engine (:class:`EngineSampler`); and running it all
(:func:`open_gateway`, :func:`serve`).
"""

from .app import GENERATION_ROUTES, GatewayOptions, make_app
from .engine_sampler import EngineSampler, choice_key
from .errors import GatewayError, RequestError, UpstreamError
from .metrics import GatewayMetrics
from .passthrough import ENGINE_ROUTES
from .request import Limits
from .sampler import ChoiceResult, Prompt, Sampler, SampleRequest, TokenResult
from .serve import RunningGateway, open_gateway, serve

__all__ = [
    "ENGINE_ROUTES",
    "GENERATION_ROUTES",
    "ChoiceResult",
    "EngineSampler",
    "GatewayError",
    "GatewayMetrics",
    "GatewayOptions",
    "Limits",
    "Prompt",
    "RequestError",
    "RunningGateway",
    "SampleRequest",
    "Sampler",
    "TokenResult",
    "UpstreamError",
    "choice_key",
    "make_app",
    "open_gateway",
    "serve",
]
