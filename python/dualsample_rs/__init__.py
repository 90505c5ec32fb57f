"""dualsample_rs: sample token by token from q* ∝ π_θ^(1−α)·π_t^α.

The kernels (``solve_alpha``, ``mix``, ``merge_topk``, ``step``) run in Rust with the
GIL released; :mod:`dualsample_rs.reference` holds the same functions in numpy.
"""

from __future__ import annotations

from ._core import SamplerConfig, StepResult, __version__, build_profile, merge_topk, mix, solve_alpha, step
from .exceptions import DualSampleError, InvalidDtypeError, InvalidInputError

__all__ = [
    "DualSampleError",
    "InvalidDtypeError",
    "InvalidInputError",
    "SamplerConfig",
    "StepResult",
    "__version__",
    "build_profile",
    "merge_topk",
    "mix",
    "solve_alpha",
    "step",
]
