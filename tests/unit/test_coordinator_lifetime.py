"""The coordinator goes with its application: the rule it exits by, as a table."""

from __future__ import annotations

import pytest

from deployments.config import CoordinatorConfig
from deployments.coordinator import orphaned


@pytest.mark.parametrize("last_report_s, now_s, gone", [
    (None, 10_000.0, False),   # no replica has reported yet: replicas may take minutes to load
    (100.0, 100.0, False),
    (100.0, 159.9, False),     # reports stopped a moment ago (a replica restarting)
    (100.0, 160.0, True),      # none for orphan_exit_s: the app is gone
    (100.0, 1e9, True),
])
def test_orphaned(last_report_s, now_s, gone):
    assert orphaned(last_report_s, now_s, 60.0) is gone


def test_orphan_exit_is_configured_and_positive():
    assert CoordinatorConfig().orphan_exit_s == 60.0
    with pytest.raises(ValueError, match="orphan_exit_s"):
        CoordinatorConfig(orphan_exit_s=0)
