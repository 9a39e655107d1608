"""Fail-open with a durable spool, with real processes: the sidecar down, 50 calls allowed
open, the client killed; a new client on the same spool and the sidecar back → 50 usage
records, each once, marked fail-open, counted in the windows."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from datetime import UTC, datetime
from pathlib import Path

from billing_core.billing.model import quota
from billing_core.db.pool import open_pool
from billing_core.settings import Settings
from quota_service.server import create_server
from tests import factories as f
from tests.conftest import fresh_database
from tests.reliability import harness

ROOT = str(Path(__file__).resolve().parents[2])


def _lines(path: str) -> list[bytes]:
    return Path(path).read_bytes().splitlines()


async def _client(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.e2e.spool_client",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": ROOT},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode() + err.decode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_usage_allowed_open_is_counted_once_after_a_crash(
    server_url: str, tmp_path: Path
) -> None:
    calls = 50 * harness.scale()
    port, spool = _free_port(), str(tmp_path / "usage.spool")
    target = f"127.0.0.1:{port}"
    with fresh_database(server_url, "bp_spool") as url:
        pool = await open_pool(url, 2)
        try:
            now = datetime.now(UTC)
            plan = await f.plan(pool, now, "spool", [quota("messages", "daily", 10)])
            tenant = await f.tenant(pool, now, "spooler", plan)
            # the sidecar is down: everything is allowed open, then the client is killed
            code, out = await _client(
                "allow", "--target", target, "--spool", spool, "--tenant", tenant,
                "--calls", str(calls),
            )  # fmt: skip
            assert code == -signal.SIGKILL and out.split()[0] == str(calls), out
            assert len(_lines(spool)) == calls
            server = await create_server(
                Settings(database_url=url, grpc_port=port, metrics_port=-1)
            )
            await server.start()
            try:
                code, out = await _client("drain", "--target", target, "--spool", spool)
                assert code == 0 and out.strip() == "0", out
                code, out = await _client("drain", "--target", target, "--spool", spool)
                assert code == 0, out  # a second client finds nothing more to report
            finally:
                await server.stop(grace=1)
            records = await f.fetch(
                pool,
                "SELECT count(*), count(DISTINCT request_id), sum(amount),"
                " bool_and(kind = 'fail_open'), count(*) FILTER (WHERE over_limit)"
                " FROM usage_records WHERE tenant_id = %s",
                tenant,
            )
            assert records == [(calls, calls, calls, True, calls - 10)]
            [(used,)] = await f.fetch(
                pool, "SELECT used FROM usage_counters WHERE tenant_id = %s", tenant
            )
            assert used == calls
            assert _lines(spool) == []  # emptied once all was reported
            harness.report(
                "fail-open with the spool: sidecar down, client SIGKILLed, both back",
                load=calls,
                load_unit="calls",
                faults=2,
                lost=calls - records[0][1],
                counted_twice=records[0][0] - records[0][1],
                applied_twice=0,
                notes="every call allowed open reported once, marked fail_open",
            )
        finally:
            await pool.close()
