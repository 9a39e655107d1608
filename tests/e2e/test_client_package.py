"""The client distribution installs alone (grpcio + protobuf only) and talks to a sidecar."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from billing_core.billing.model import quota
from quota_service.server import QuotaServer
from tests import factories as f

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib.util, json, sys
from quota_client import QuotaClient, FailureMode, Tokens, pb

forbidden = [m for m in ("sqlalchemy", "stripe", "starlette", "psycopg", "billing_core")
             if importlib.util.find_spec(m) is not None]
target, tenant = sys.argv[1], sys.argv[2]
with QuotaClient(target) as client:
    first = client.check_and_consume(tenant, "messages", 2, request_id="venv-1")
    replay = client.check_and_consume(tenant, "messages", 2, request_id="venv-1")
    with client.reserve(tenant, "messages", 3) as r:
        committed = r.commit(1)
    try:
        with client.reserve(tenant, "messages", 3) as r2:
            raise ValueError("work failed")
    except ValueError:
        pass
    usage = client.get_usage(tenant)
with QuotaClient("127.0.0.1:1", retries=1, backoff=0.01, default_timeout=0.5) as dead:
    opened = dead.check_and_consume(tenant, "messages", 1, failure_mode=FailureMode.OPEN)
print(json.dumps({
    "forbidden": forbidden,
    "allowed": first.allowed,
    "replayed": replay.replayed,
    "same_record": replay.usage_record_id == first.usage_record_id,
    "committed_used": committed.windows[0].used,
    "used": usage.resources[0].windows[0].used,
    "fail_open": opened.allowed,
}))
"""


@pytest.mark.slow
async def test_client_installs_in_a_fresh_virtualenv_and_calls_the_sidecar(
    sidecar: QuotaServer, pool: AsyncConnectionPool[Any], uid: str, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    plan = await f.plan(pool, now, uid, [quota("messages", "daily", 100)])
    t = await f.tenant(pool, now, f"t-{uid}", plan)
    venv = tmp_path / "venv"

    async def run(*args: str) -> str:
        # run outside the repository so nothing of the project is importable by accident
        proc = await asyncio.create_subprocess_exec(
            *args, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out.decode()
        return out.decode()

    await run(sys.executable, "-m", "venv", str(venv))
    await run(str(venv / "bin/pip"), "install", "--quiet", str(ROOT / "clients/python"))
    out = await run(str(venv / "bin/python"), "-c", SCRIPT, f"127.0.0.1:{sidecar.port}", t)
    result = json.loads(out.strip().splitlines()[-1])
    assert result == {
        "forbidden": [],
        "allowed": True,
        "replayed": True,
        "same_record": True,
        "committed_used": 3,
        "used": 3,
        "fail_open": True,
    }
