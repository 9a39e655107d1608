"""`make bench` in miniature, so the harness cannot rot (no timing is asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
async def test_bench_smoke_run_produces_its_reports(server_url: str, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench",
        "--smoke",
        "--out",
        str(tmp_path),
        env={**os.environ, "DATABASE_URL": server_url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()[-4000:]
    report = json.loads((tmp_path / "latest.json").read_text())
    servers = {r["server"] for r in report["results"]}
    assert servers == {
        "echo",
        "textbook",
        "floor (1 round trip)",
        "floor (2 round trips)",
        "sidecar",
        "sidecar (no coalescing)",
        "3 sidecars, one database",
        "sidecar via PgBouncer",
        "sidecar, DB_GENERIC_PLANS=off",
        "control plane",
    }
    floors = [r for r in report["results"] if r["server"].startswith("floor")]
    assert {r["in_flight"] for r in floors} == {1}
    # the smoke run measures 1 and 8 in flight: every lone-call ratio is there
    lone = [r for r in [*report["targets"], *report["references"]] if "1 in flight" in r["measure"]]
    assert len(lone) == 7 and all(r["value"] is not None for r in lone)
    assert {r["scenario"] for r in report["results"]} == {
        "hot",
        "10k-uniform",
        "zipf",
        "history",
        "hot, reserve+commit",
        "overview, no records",
        "overview, history",
    }
    assert all(r["calls_per_s"] > 0 and r["errors"] == 0 for r in report["results"])
    # the history point follows the hot point it is compared with, in every round
    points = [(r["server"], r["scenario"]) for r in report["results"]]
    assert points[points.index(("sidecar", "history")) - 1] == ("sidecar", "hot")
    assert report["meta"]["history_insert_s"] >= 0
    # the billing overview with a history against none, in every round
    [overview] = [r for r in report["targets"] if r["measure"].startswith("billing overview")]
    assert len(overview["rounds"]) == 2 and overview["value"] is not None
    assert report["meta"]["page_rows"] == 2_000
    # Reserve + Commit by both sidecars: what coalescing them gives, in the same run
    pairs = {r["server"] for r in report["results"] if r["scenario"] == "hot, reserve+commit"}
    assert pairs == {"sidecar", "sidecar (no coalescing)"}
    assert report["meta"]["correctness"] == {
        "windows_not_matching_records": 0,
        "windows_over_limit": 0,
        "wallet_off_ledger_micros": 0,
    }
    # the machine's CPU per call is measured beside the server's: PostgreSQL worked for the
    # sidecar, the load processes for everyone
    sidecar = [r for r in report["results"] if r["server"] == "sidecar"]
    assert sum(r["db_cpu_ms_per_call"] for r in sidecar) > 0
    assert all(r["db_cpu_ms_per_call"] >= 0 for r in report["results"])
    grpc_points = [r for r in report["results"] if r["server"] != "control plane"]
    assert all(r["load_cpu_ms_per_call"] > 0 for r in grpc_points)
    # three sidecars on one database answer every call, allowed: the books stay exact
    [three] = [r for r in report["results"] if r["server"] == "3 sidecars, one database"][:1]
    assert three["in_flight"] == 8 and three["errors"] == 0
    assert report["meta"]["rounds"] == 2
    assert all(len(r["extra"]["calls_per_s_by_round"]) == 2 for r in report["results"])
    table = (tmp_path / "latest.md").read_text()
    assert "| measure | value | per round | target | met |" in table
    assert "| for reference (no target) | value | per round |" in table
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
