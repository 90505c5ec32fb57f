from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

# Few examples locally, many in CI (HYPOTHESIS_PROFILE=ci, which `make test` sets).
# Derandomised with no example database, so a run is the same on every machine.
_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "derandomize": True, "database": None}
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("ci", max_examples=400, **_common)
# Long random exploration, by hand: HYPOTHESIS_PROFILE=stress .venv/bin/python -m pytest tests.
settings.register_profile("stress", max_examples=3000, **{**_common, "derandomize": False})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# The real engines' tests need the engines installed and minutes to start them: they run
# with `make test-engines` (which sets DUALSAMPLE_ENGINES), not with `make test`.
collect_ignore = [] if os.environ.get("DUALSAMPLE_ENGINES") else ["engines"]


# The reference servers the end-to-end tests share, each pair started once a session
# (the first test that asks for it) and stopped at the end. The coordinator's requests
# carry everything their answers depend on (log probabilities, or seeded samples), so
# tests cannot disturb one another through them. A test that needs a server set up
# otherwise (faults, caps, another model), one it kills, or one whose unseeded samples
# it counts on from a fresh start, starts its own.


@pytest.fixture(scope="session")
def urls() -> Iterator[tuple[str, str]]:
    """A base and a teacher reference server with the default flags: (base, teacher)."""
    from dualsample_rs.server import running_server

    with running_server("base") as a, running_server("teacher") as b:
        yield a, b


@pytest.fixture(scope="session")
def flavors() -> Iterator[dict[str, tuple[str, str]]]:
    """(base, teacher) URLs per flavor: ``"vllm"`` with the generate route on (the base
    with trace replay and a logprob cap of 64), and ``"sglang"``."""
    from dualsample_rs.server import running_flavors

    with running_flavors() as pairs:
        yield pairs


@pytest.fixture(scope="session")
def sglang_pair(flavors: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """A base and a teacher answering as SGLang, with the default flags."""
    return flavors["sglang"]


@pytest.fixture(scope="session")
def generate_pair() -> Iterator[tuple[str, str]]:
    """A vLLM base and teacher that also serve the generate route (--enable-scale-out),
    otherwise with the default flags (no trace replay, a logprob cap of 20)."""
    from dualsample_rs.server import running_server

    with running_server("base", enable_scale_out=True) as a, running_server("teacher", enable_scale_out=True) as b:
        yield a, b


@pytest.fixture(scope="session")
def math_teachers() -> Iterator[dict[str, str]]:
    """A second teacher (``teacher-math``: trained on other text, same tokenizer) per
    flavor: ``{"vllm": ..., "sglang": ...}`` (the vLLM one also serves the generate route)."""
    from dualsample_rs.server import running_server

    with (
        running_server("teacher-math", enable_scale_out=True) as v,
        running_server("teacher-math", flavor="sglang") as s,
    ):
        yield {"vllm": v, "sglang": s}
