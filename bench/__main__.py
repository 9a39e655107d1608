"""`make bench`: the sidecar measured side by side with an echo server and the textbook
implementation, in one run, on this machine; results as ratios. Two floors (bench.servers)
show at one call in flight what any durable call costs the same stack, without a target.

    python -m bench                 # the full run (several minutes, 5M historic records,
                                    # a billing overview with 1M records)
    python -m bench --smoke         # seconds; what the test suite runs so this cannot rot

All servers run from the start and every point is measured in each of several rounds, so
that a ratio compares two measurements taken a minute apart, not ten: this machine's speed
drifts by a third over minutes. A point's figures are the median over the rounds; a ratio
is the median of the per-round ratios. Writes bench/results/latest.{json,md,png} and
prints the table."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import pages
from bench.data import add_history, check_books, seed, vacuum
from bench.measure import ROOT, Config, Server, drive, start_reference, start_sidecar
from bench.pooler import pgbouncer
from bench.report import (
    CUSTOM_PLANS,
    FLOORS,
    RESERVE_COMMIT,
    SIDECARS_3,
    THROUGH_PGBOUNCER,
    Result,
    chart,
    combine,
    markdown,
    ratios,
    references,
)
from billing_core.db.embedded import drop_database, ensure_database, start_embedded
from billing_core.db.migrate import upgrade

RESULTS = ROOT / "bench" / "results"
TENANTS = 10_000


def run(cfg: Config, out: Path, database_url: str | None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="bp-bench-"))
    embedded = None
    if database_url:
        server_url, where = database_url, "DATABASE_URL server"
    else:
        embedded, server_url = start_embedded(tmp / "pg", throwaway=True)
        where = "embedded PostgreSQL 18"
    # two databases alike but for the history: the history point is measured in every
    # round right after the hot point it is compared with, not minutes later
    names = [f"bp_bench_{os.getpid()}", f"bp_bench_{os.getpid()}_history"]
    url, history_url = (ensure_database(server_url, db_name) for db_name in names)
    servers: list[Server] = []
    exits = contextlib.ExitStack()  # the PgBouncer
    page_server: pages.PageServer | None = None
    rounds: list[list[Result]] = [[] for _ in range(cfg.rounds)]
    started = datetime.now(UTC)
    try:
        for db in (url, history_url):
            upgrade(db)
            asyncio.run(seed(db, cfg.tenants))
        history_s = asyncio.run(add_history(history_url, cfg.history_rows))
        page_s = asyncio.run(pages.add_page_tenants(history_url, cfg.page_rows))
        plan = [
            ("echo", ["hot", "10k-uniform"]),
            ("textbook", ["hot"]),
            *((floor, ["hot"]) for floor in FLOORS),
            ("sidecar", ["hot", "10k-uniform", "zipf", RESERVE_COMMIT]),
            ("sidecar (no coalescing)", ["hot", RESERVE_COMMIT]),
            (SIDECARS_3, ["hot", "10k-uniform"]),
            (THROUGH_PGBOUNCER, ["hot"]),
            (CUSTOM_PLANS, ["hot"]),
        ]
        points: list[tuple[Server, str, int]] = []
        pool = cfg.sidecar_pool or 8
        sized = {"QUOTA_DB_POOL_SIZE": str(pool)}
        for server_name, scenarios in plan:
            if server_name == SIDECARS_3:
                # a third of the pool each: the three hold the connections one sidecar does
                env = {"QUOTA_DB_POOL_SIZE": str(max(1, round(pool / 3)))}
                server = start_sidecar(url, True, name=server_name, count=3, env=env)
            elif server_name == THROUGH_PGBOUNCER:
                bouncer = exits.enter_context(pgbouncer(url))
                env = {**sized, "DB_PREPARED_STATEMENTS": "off"}
                server = start_sidecar(bouncer, True, name=server_name, env=env)
            elif server_name == CUSTOM_PLANS:
                env = {**sized, "DB_GENERIC_PLANS": "off"}
                server = start_sidecar(url, True, name=server_name, env=env)
            elif server_name.startswith("sidecar"):
                server = start_sidecar(url, coalesce=server_name == "sidecar", env=sized)
            else:
                server = start_reference(server_name, url)
            servers.append(server)
            for scenario in scenarios:
                for n in cfg.in_flight:
                    if server_name == SIDECARS_3:
                        if n != max(cfg.in_flight):
                            continue  # several sidecars are about many calls in flight
                    elif server_name != "sidecar" and n == 8:
                        continue  # the references at 1 and 64 are what the ratios use
                    if server_name in FLOORS and n != 1:
                        continue  # a floor bounds the latency of a lone call
                    if scenario == RESERVE_COMMIT and n == 8:
                        continue
                    points.append((server, scenario, n))
        # a sidecar of its own on the database with the history, measured right after the
        # other sidecar's last hot point (64 in flight)
        historian = start_sidecar(history_url, coalesce=True, env=sized)
        servers.append(historian)
        hot = max(i for i, (s, sc, _) in enumerate(points) if s.name == "sidecar" and sc == "hot")
        points.insert(hot + 1, (historian, "history", 64))
        vacuum(url)
        vacuum(history_url)
        # the billing overview on the database with the history, after the sidecars' points
        page_server = pages.start(history_url)
        for i, results in enumerate(rounds):
            for j, (server, scenario, n) in enumerate(points):
                results.append(drive(server, scenario, n, cfg))
                print(f"  round {i + 1}  {server.name:24} {scenario:12} {n:3} in flight: "
                      f"{results[-1].calls_per_s:8,.0f} calls/s", flush=True)  # fmt: skip
                if j + 1 == len(points) or points[j + 1][0] is not server:
                    # the next server starts where this one did: no cleanup mid-measurement
                    vacuum(history_url if server is historian else url)
            results += pages.measure(page_server, cfg.page_renders)
            print(f"  round {i + 1}  overview: " + ", ".join(
                f"{r.scenario} {r.p50_ms:.1f} ms" for r in results[-2:]), flush=True)  # fmt: skip
        page_server.stop()
        page_server = None
        for server in servers:
            server.stop()
        books = [asyncio.run(check_books(db, started)) for db in (url, history_url)]
        correctness = {key: sum(abs(b[key]) for b in books) for key in books[0]}
    finally:
        if page_server is not None:
            page_server.stop()
        for server in servers:
            if server.running():
                server.stop()
        exits.close()
        for db_name in names:
            drop_database(server_url, db_name)
        if embedded is not None:
            embedded.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    results = [combine([r[i] for r in rounds]) for i in range(len(rounds[0]))]
    meta = {
        "at": started.strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "database": where,
        "seconds": cfg.seconds,
        "rounds": cfg.rounds,
        "history_rows": cfg.history_rows,
        "history_insert_s": round(history_s, 1),
        "page_rows": cfg.page_rows,
        "page_insert_s": round(page_s, 1),
        "page_renders": cfg.page_renders,
        "correctness": correctness,
    }
    rows, reference_rows = ratios(rounds), references(rounds)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": meta,
        "targets": rows,
        "references": reference_rows,
        "results": [r.__dict__ for r in results],
    }
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(results, rows, meta, reference_rows)
    (out / "latest.md").write_text(table)
    chart(results, out / "latest.png")
    print()
    print(table)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny run: the harness works")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.smoke:
        cfg = Config(
            seconds=0.3, warmup=0.1, history_rows=2_000, tenants=200, in_flight=(1, 8),
            rounds=2, page_rows=2_000, page_renders=3,
            sidecar_pool=2,  # small pools: the smoke run shares its server with a test session
        )  # fmt: skip
    else:
        cfg = Config(seconds=4.0, warmup=1.0, history_rows=5_000_000, tenants=TENANTS, rounds=3)
    report = run(cfg, args.out, os.environ.get("DATABASE_URL", "").strip() or None)
    bad = {k: v for k, v in report["meta"]["correctness"].items() if v}
    if bad:
        print(f"correctness check failed: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
