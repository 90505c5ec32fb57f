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


@pytest.fixture(scope="session")
def urls() -> Iterator[tuple[str, str]]:
    """A base and a teacher reference server, shared by the end-to-end tests."""
    from dualsample_rs.server import running_server

    with running_server("base") as a, running_server("teacher") as b:
        yield a, b
