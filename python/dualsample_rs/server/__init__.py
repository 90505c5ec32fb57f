"""A small vLLM- and SGLang-compatible server with real (tiny) n-gram models, for offline use.

It speaks the parts of vLLM 0.33's and SGLang 0.5's APIs that dualsample_rs uses, so the
demo, tests and benchmarks run over real sockets with real probabilities, no GPU needed.
"""

from .faults import FaultConfig
from .model import Model, NGramModel, load_preset
from .process import ServerStartError, request_counts, running_flavors, running_server

__all__ = [
    "FaultConfig",
    "Model",
    "NGramModel",
    "ServerStartError",
    "load_preset",
    "request_counts",
    "running_flavors",
    "running_server",
]
