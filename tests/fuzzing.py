"""Hypothesis settings for the fuzz suites (tests/*/test_fuzz_*.py), as named profiles.

    ci   the default: derandomized (the same examples on every run, so CI is reproducible and a
         failure reruns as it failed), no example database, no deadline (servers are involved and
         the CI machine is shared), bounded examples so the suites stay within their time budget.
    dev  random and ten times the examples, for hunting locally:
         SNAPWAKE_FUZZ_PROFILE=dev pytest tests -k fuzz

The profiles are applied per test (``fuzz_settings``), never loaded globally, so other
hypothesis tests keep their own settings.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

__all__ = ["PROFILE", "fuzz_settings"]

settings.register_profile(
    "ci", derandomize=True, database=None, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much])
settings.register_profile("dev", settings.get_profile("ci"), derandomize=False)
PROFILE = os.environ.get("SNAPWAKE_FUZZ_PROFILE", "ci")
_SCALE = 10 if PROFILE == "dev" else 1


def fuzz_settings(max_examples: int, **overrides: Any) -> settings:
    """The active profile with ``max_examples`` (times ten under ``dev``)."""
    return settings(settings.get_profile(PROFILE), max_examples=max_examples * _SCALE, **overrides)
