"""Settings come from the environment, typed and checked once."""

from __future__ import annotations

import pytest

from billing_core.errors import InvalidRequest
from billing_core.settings import Settings


def test_defaults_and_overrides() -> None:
    assert Settings.from_env({}).coalesce_gather_us == 2000
    env = {"QUOTA_COALESCE_GATHER_US": "0", "QUOTA_COALESCE_LANES": "2"}
    settings = Settings.from_env(env)
    assert (settings.coalesce_gather_us, settings.coalesce_lanes) == (0, 2)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"QUOTA_COALESCE_GATHER_US": "-1"}, "QUOTA_COALESCE_GATHER_US must be between"),
        ({"QUOTA_COALESCE_GATHER_US": "100001"}, "QUOTA_COALESCE_GATHER_US must be between"),
        ({"QUOTA_COALESCE_GATHER_US": "2ms"}, "must be an integer"),
        ({"QUOTA_COALESCE_STALL_MS": "-1"}, "QUOTA_COALESCE_STALL_MS must be between"),
        ({"QUOTA_COALESCE_STALL_MS": "60001"}, "QUOTA_COALESCE_STALL_MS must be between"),
        ({"QUOTA_BATCH_LOCK_TIMEOUT_MS": "-1"}, "QUOTA_BATCH_LOCK_TIMEOUT_MS must be between"),
        ({"QUOTA_BATCH_LOCK_TIMEOUT_MS": "600001"}, "QUOTA_BATCH_LOCK_TIMEOUT_MS must be"),
        ({"QUOTA_COALESCE_LANES": "0"}, "QUOTA_COALESCE_LANES must be between 1 and 64"),
        ({"QUOTA_COALESCE_LANES": "65"}, "QUOTA_COALESCE_LANES must be between 1 and 64"),
        ({"QUOTA_DB_POOL_SIZE": "0"}, "QUOTA_DB_POOL_SIZE must be at least 1"),
        ({"IDEMPOTENCY_TTL_HOURS": "1"}, "IDEMPOTENCY_TTL_HOURS must be at least 24"),
        ({"AUTH_FAILURES_PER_MINUTE": "-1"}, "AUTH_FAILURES_PER_MINUTE must not be negative"),
        ({"BILLING_LINK_SECRET": "short"}, "BILLING_LINK_SECRET must be at least 32"),
        ({"BILLING_SESSION_HOURS": "0"}, "BILLING_SESSION_HOURS must be between 1 and 720"),
    ],
)
def test_bad_values_are_refused_with_the_setting_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        Settings.from_env(env)
