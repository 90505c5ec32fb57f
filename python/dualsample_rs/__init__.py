"""dualsample_rs: sample token by token from q* ∝ π_θ^(1−α)·π_t^α.

The kernels (``solve_alpha``, ``mix``, ``merge_topk``, ``step``) run in Rust with the
GIL released; :mod:`dualsample_rs.reference` holds the same functions in numpy.
"""

from __future__ import annotations

from ._core import (
    SamplerConfig,
    StepResult,
    __version__,
    build_profile,
    merge_topk,
    mix,
    mix_teachers,
    solve_alpha,
    step,
)
from .backends import SGLangBackend, VLLMCompletionsBackend, VLLMGenerateBackend
from .config.coordinator import CoordinatorConfig, EnhancedCoordinatorConfig, TeacherSettings
from .engine.coordinator import (
    Coordinator,
    DualVLLMCoordinator,
    EnhancedDualVLLMCoordinator,
    generate_with_dual_prompts,
)
from .engine.sequence import WorkItem, stable_key
from .exceptions import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    ConfigurationError,
    DualSampleError,
    InvalidDtypeError,
    InvalidInputError,
    InvalidResponseError,
)
from .io.record import GenerationOutput

# The vLLM completions backend under its earlier name.
VLLMClient = VLLMCompletionsBackend

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "ConfigurationError",
    "Coordinator",
    "CoordinatorConfig",
    "DualSampleError",
    "DualVLLMCoordinator",
    "EnhancedCoordinatorConfig",
    "EnhancedDualVLLMCoordinator",
    "GenerationOutput",
    "InvalidDtypeError",
    "InvalidInputError",
    "InvalidResponseError",
    "SGLangBackend",
    "SamplerConfig",
    "StepResult",
    "TeacherSettings",
    "VLLMClient",
    "VLLMCompletionsBackend",
    "VLLMGenerateBackend",
    "WorkItem",
    "__version__",
    "build_profile",
    "generate_with_dual_prompts",
    "merge_topk",
    "mix",
    "mix_teachers",
    "solve_alpha",
    "stable_key",
    "step",
]
