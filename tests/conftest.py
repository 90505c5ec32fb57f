from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Few examples locally, many in CI (HYPOTHESIS_PROFILE=ci, which `make test` sets).
# Derandomised with no example database, so a run is the same on every machine.
_common = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow], "derandomize": True, "database": None}
settings.register_profile("dev", max_examples=60, **_common)
settings.register_profile("ci", max_examples=400, **_common)
# Long random exploration, by hand: HYPOTHESIS_PROFILE=stress .venv/bin/python -m pytest tests.
settings.register_profile("stress", max_examples=3000, **{**_common, "derandomize": False})
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
