"""Deliberate misbehaviour for reliability tests, deterministic under a seed.

Each request draws its fault decisions from one seeded generator in arrival order, so a
run that sends the same requests in the same order meets the same faults.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

RATE_FIELDS = ("latency_rate", "error_500_rate", "error_503_rate", "drop_rate", "malformed_rate", "slow_body_rate")


@dataclass
class FaultConfig:
    """Rates are probabilities per request; times are seconds."""

    seed: int = 0
    latency: float = 0.0
    latency_rate: float = 0.0
    error_500_rate: float = 0.0
    error_503_rate: float = 0.0
    retry_after: float = 1.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    slow_body_rate: float = 0.0
    slow_body_seconds: float = 1.0
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        for name in RATE_FIELDS:
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        for name in ("latency", "retry_after", "slow_body_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        self._rng = random.Random(self.seed)

    @property
    def active(self) -> bool:
        return any(getattr(self, n) > 0 for n in RATE_FIELDS)

    def draw(self) -> Fault:
        """The faults for the next request."""
        u = [self._rng.random() for _ in range(6)]
        kind = None
        for name, rate, x in (
            ("500", self.error_500_rate, u[1]),
            ("503", self.error_503_rate, u[2]),
            ("drop", self.drop_rate, u[3]),
            ("malformed", self.malformed_rate, u[4]),
        ):
            if x < rate:
                kind = name
                break
        return Fault(
            delay=self.latency if u[0] < self.latency_rate else 0.0,
            kind=kind,
            slow_body=kind is None and u[5] < self.slow_body_rate,
        )


@dataclass(frozen=True)
class Fault:
    delay: float = 0.0
    kind: str | None = None  # "500", "503", "drop", "malformed" or None
    slow_body: bool = False


NO_FAULT = Fault()
