from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Few examples locally, many in CI: HYPOTHESIS_PROFILE=ci.
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
