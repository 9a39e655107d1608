"""The operator CLI, run as a real process against the test database."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta

from billing_core.billing.api_keys import verify_api_key
from billing_core.billing.model import quota
from billing_core.db.unit_of_work import Database
from billing_core.rules.limits import SubscriptionStatus
from tests import factories as f


async def cli(database_url: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "control_plane",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "DATABASE_URL": database_url, "LOG_FORMAT": "json"},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_help_lists_every_command(scratch_database: str) -> None:
    code, out, _ = await cli(scratch_database, "--help")
    assert code == 0
    for command in (
        "serve",
        "create-api-key",
        "list-api-keys",
        "revoke-api-key",
        "seed-demo",
        "list-plans",
        "expire-trials",
    ):
        assert command in out


async def test_seed_list_key_and_expire_each_change_audited(scratch_database: str) -> None:
    database_url = scratch_database
    code, out, _ = await cli(database_url, "seed-demo")
    assert code == 0 and out.strip() in {"seeded", "already seeded"}
    code, out, _ = await cli(database_url, "seed-demo")
    assert out.strip() == "already seeded"
    code, out, _ = await cli(database_url, "list-plans")
    assert code == 0
    lines = {line.split("\t")[0]: line.split("\t") for line in out.splitlines()}
    assert lines["pro"][2] == "20.00 usd" and lines["pro"][3] == "active"
    code, out, _ = await cli(database_url, "create-api-key", "--name", "ops")
    key = out.strip()
    db = await Database.open(database_url, 1)
    try:
        async with db.transaction() as uow:
            assert await verify_api_key(uow, key) is not None
        # a card-less trial that ended yesterday, beside the seed's running one
        ended = datetime.now(UTC) - timedelta(days=15)
        plan = await f.plan(db.pool, ended, "cli", [quota("messages", "daily", 10)])
        await f.tenant(
            db.pool,
            ended,
            "cli-trial",
            plan,
            status=SubscriptionStatus.TRIALING,
            trial_end=ended + timedelta(days=14),
        )
        code, out, _ = await cli(database_url, "expire-trials")
        assert code == 0 and out.strip() == "expired 1 trial(s)"
        code, out, _ = await cli(database_url, "expire-trials")
        assert out.strip() == "expired 0 trial(s)"
        audit = await f.fetch(
            db.pool,
            "SELECT actor, action, entity_id, after ->> 'status', after ->> 'prefix'"
            " FROM audit_log WHERE actor = 'cli' ORDER BY audit_id",
        )
    finally:
        await db.close()
    assert audit == [
        ("cli", "api_key.create", audit[0][2], None, key[:12]),
        ("cli", "subscription.trial_expired", "cli-trial", "trial_expired", None),
    ]
    code, _, err = await cli(database_url, "no-such-command")
    assert code == 2 and "invalid choice" in err


async def test_keys_are_listed_without_secrets_and_revoked_at_once(scratch_database: str) -> None:
    code, out, _ = await cli(
        scratch_database, "create-api-key", "--name", "dashboards", "--scope", "read"
    )
    assert code == 0
    key = out.strip()
    code, out, _ = await cli(scratch_database, "list-api-keys")
    [row] = [line.split("\t") for line in out.splitlines() if "dashboards" in line]
    key_id, prefix, scope, name, state = row
    assert (prefix, scope, name, state) == (f"{key[:12]}…", "read", "dashboards", "live")
    assert key not in out  # the secret is shown once, at creation
    code, out, _ = await cli(scratch_database, "revoke-api-key", key_id)
    assert code == 0 and out.strip() == f"revoked {key_id} ({key[:12]}…)"
    code, out, _ = await cli(scratch_database, "list-api-keys")
    assert "revoked" in next(line for line in out.splitlines() if key_id in line)
    code, _, err = await cli(scratch_database, "revoke-api-key", "key_nope")
    assert code == 2 and "unknown API key" in err
    code, _, err = await cli(scratch_database, "create-api-key", "--scope", "root")
    assert code == 2 and "invalid choice" in err
    db = await Database.open(scratch_database, 1)
    try:
        async with db.transaction() as uow:
            assert await verify_api_key(uow, key) is None
        audit = await f.fetch(
            db.pool, "SELECT action FROM audit_log WHERE entity_id = %s ORDER BY audit_id", key_id
        )
    finally:
        await db.close()
    assert audit == [("api_key.create",), ("api_key.revoke",)]
