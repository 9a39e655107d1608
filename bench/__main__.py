"""`make bench`: the sidecar measured side by side with an echo server and the textbook
implementation, in one run, on this machine; results as ratios. Two floors (bench.servers)
show at one call in flight what any durable call costs the same stack, without a target.

    python -m bench                 # the full run (several minutes, 5M historic records)
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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc

from billing_core.billing.model import PlanSpec, PriceView, quota
from billing_core.billing.plans import create_plan
from billing_core.billing.prices import set_price
from billing_core.billing.subscriptions import subscribe
from billing_core.billing.tenants import create_tenant
from billing_core.billing.wallet import credit
from billing_core.db.embedded import drop_database, ensure_database, start_embedded
from billing_core.db.migrate import upgrade
from billing_core.db.pool import open_pool
from billing_core.db.unit_of_work import Database

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TENANTS = 10_000
HOT = "bench-hot"


@dataclass
class Config:
    seconds: float
    warmup: float
    history_rows: int
    tenants: int
    in_flight: tuple[int, ...] = (1, 8, 64)
    rounds: int = 3


@dataclass
class Server:
    name: str
    process: subprocess.Popen[str]
    target: str

    def cpu_seconds(self) -> float:
        return _cpu_ticks(self.process.pid)[1] / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass
class Result:
    server: str
    scenario: str
    in_flight: int
    calls_per_s: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    cpu_ms_per_call: float
    peak_rss_mb: float
    errors: int
    extra: dict[str, Any] = field(default_factory=dict)
    # the rest of the machine's CPU per call: every PostgreSQL process, the load process
    db_cpu_ms_per_call: float = 0.0
    load_cpu_ms_per_call: float = 0.0


def _cpu_ticks(pid: int) -> tuple[str, int]:
    """A process's name and the CPU ticks (user + system) it has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    name, rest = stat[stat.index("(") + 1 :].rsplit(")", 1)
    fields = rest.split()
    return name, int(fields[11]) + int(fields[12])


def postgres_cpu_ticks() -> dict[int, int]:
    """CPU ticks used so far by each PostgreSQL process on this machine (backends, WAL
    writer, checkpointer; the bench's database is the only busy one)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name, ticks = _cpu_ticks(int(pid))
        except OSError:  # gone meanwhile
            continue
        if name.startswith("postgres"):
            found[int(pid)] = ticks
    return found


def postgres_cpu_since(before: dict[int, int]) -> float:
    """Seconds of CPU the PostgreSQL processes used since `before`, process by process (one
    that exited meanwhile takes its CPU along: a slight undercount, never a negative)."""
    now = postgres_cpu_ticks()
    ticks = sum(t - before.get(pid, 0) for pid, t in now.items())
    return ticks / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_serving(target: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise RuntimeError(f"{target} did not become SERVING")


def start_sidecar(database_url: str, coalesce: bool) -> Server:
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "QUOTA_GRPC_PORT": str(port),
        "QUOTA_METRICS_PORT": "-1",
        "QUOTA_COALESCE": "on" if coalesce else "off",
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
    }
    proc = subprocess.Popen([sys.executable, "-m", "quota_service"], env=env, cwd=ROOT, text=True)
    target = f"127.0.0.1:{port}"
    _wait_serving(target)
    return Server("sidecar" if coalesce else "sidecar (no coalescing)", proc, target)


# the references by name in the tables: their kind in bench.servers
REFERENCES = {
    "echo": "echo",
    "textbook": "textbook",
    "floor (1 round trip)": "floor1",
    "floor (2 round trips)": "floor2",
}
FLOORS = ("floor (1 round trip)", "floor (2 round trips)")
# the hot tenant's Reserve followed by the Commit of its reservation: one point is one pair
# (by both sidecars: what coalescing them gives, in the same run)
RESERVE_COMMIT = "hot, reserve+commit"


def start_reference(name: str, database_url: str) -> Server:
    kind = REFERENCES[name]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.servers", kind, "--database-url", database_url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Server(name, proc, f"127.0.0.1:{port}")


def drive(server: Server, scenario: str, in_flight: int, cfg: Config) -> Result:
    tenants = {"hot": "hot", "10k-uniform": "uniform", "zipf": "zipf", "history": "hot",
               RESERVE_COMMIT: "hot"}  # fmt: skip
    resource = "tokens" if tenants[scenario] == "hot" else "messages"
    calls = "reserve-commit" if scenario == RESERVE_COMMIT else "check-and-consume"
    cpu0, db0, load0 = server.cpu_seconds(), postgres_cpu_ticks(), _children_cpu_seconds()
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", "--target", server.target,
         "--in-flight", str(in_flight), "--seconds", str(cfg.seconds),
         "--warmup", str(cfg.warmup), "--tenants", tenants[scenario],
         "--tenant-count", str(cfg.tenants), "--resource", resource, "--calls", calls],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    cpu = server.cpu_seconds() - cpu0
    db, load = postgres_cpu_since(db0), _children_cpu_seconds() - load0
    data = json.loads(out.stdout)
    total_calls = max(1, data["calls"]) * (cfg.seconds + cfg.warmup) / cfg.seconds
    return Result(
        server.name,
        scenario,
        in_flight,
        data["calls_per_s"],
        data["p50_ms"],
        data["p99_ms"],
        data["p999_ms"],
        cpu * 1000 / total_calls,
        server.peak_rss_mb(),
        data["errors"],
        db_cpu_ms_per_call=db * 1000 / total_calls,
        load_cpu_ms_per_call=load * 1000 / total_calls,
    )


async def seed(database_url: str, cfg: Config) -> None:
    """Plans, prices and tenants for every scenario (once)."""
    now = datetime.now(UTC)
    db = await Database.open(database_url, 2)
    try:
        async with db.transaction() as uow:
            await set_price(uow, "bench", PriceView("bench", "bench-model", now, 1_000_000, 0), now)
            hot = await create_plan(
                uow,
                "bench",
                PlanSpec(
                    name="bench-hot",
                    price_cents=1000,
                    quotas=(
                        # the daily window runs out at once: from then on the wallet pays
                        quota("tokens", "daily", 1000, overage="wallet"),
                        quota("tokens", "monthly", 10**12),
                    ),
                ),
                now,
            )
            wide = await create_plan(
                uow,
                "bench",
                PlanSpec(name="bench-wide", price_cents=500,
                         quotas=(quota("messages", "daily", 10**12),
                                 quota("messages", "monthly", 10**12))),
                now,
            )  # fmt: skip
            await create_tenant(uow, "bench", HOT, "hot", now)
            await subscribe(uow, "bench", HOT, hot.plan_id, now)
            await credit(uow, HOT, 10**15, now, reason="bench")
        async with db.pool.connection() as conn:
            # ten thousand tenants at once: straight into their tables
            await conn.execute(
                "INSERT INTO tenants (tenant_id, name, timezone, created_at)"
                " SELECT 'bench-' || lpad(i::text, 5, '0'), 'bench', 'UTC', %s"
                " FROM generate_series(0, %s - 1) i",
                (now, cfg.tenants),
            )
            await conn.execute(
                "INSERT INTO subscriptions (tenant_id, subscription_id, plan_id, status,"
                " is_current, billing_cycle_anchor, created_at, updated_at)"
                " SELECT 'bench-' || lpad(i::text, 5, '0'), 'sub-bench-' || i, %s, 'active',"
                " true, %s, %s, %s FROM generate_series(0, %s - 1) i",
                (wide.plan_id, now, now, now, cfg.tenants),
            )
    finally:
        await db.close()


def vacuum(database_url: str) -> None:
    """Leave no cleanup of the previous step to run during the next measurement: dead rows
    vacuumed, statistics fresh, dirty pages written (CHECKPOINT needs a superuser or the
    pg_checkpoint role; without it the checkpointer catches up on its own)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
            conn.execute("CHECKPOINT")


async def add_history(database_url: str, rows: int) -> float:
    """`rows` historic usage records (a year back, across the tenants); returns seconds."""
    started = time.monotonic()
    pool = await open_pool(database_url, 1)
    try:
        async with pool.connection() as conn:
            await conn.execute(
                "INSERT INTO usage_records (tenant_id, usage_record_id, resource, amount, kind,"
                " request_id, cost_micros, occurred_at)"
                " SELECT CASE WHEN i %% 10 = 0 THEN %s"
                "        ELSE 'bench-' || lpad((i %% 10000)::text, 5, '0') END,"
                " 'ur_hist_' || i, 'tokens', 1 + i %% 100, 'consume', 'h' || i, i %% 1000,"
                " now() - interval '400 days' + i * interval '5 seconds'"
                " FROM generate_series(1, %s) i",
                (HOT, rows),
            )
            await conn.execute("ANALYZE usage_records")
    finally:
        await pool.close()
    return time.monotonic() - started


async def check_books(database_url: str, since: datetime) -> dict[str, int]:
    """Zero overshoot, zero lost, zero double-counted: counters against the records."""
    pool = await open_pool(database_url, 1)
    try:
        async with pool.connection() as conn:
            cur = await conn.execute(
                """
                SELECT count(*) FILTER (WHERE c.used <> coalesce(r.total, 0)),
                       count(*) FILTER (WHERE c.period = 'daily' AND c.resource = 'messages'
                                        AND c.used > 1000000000000)
                FROM usage_counters c
                LEFT JOIN LATERAL (
                    SELECT sum(amount) AS total FROM usage_records r
                    WHERE r.tenant_id = c.tenant_id AND r.resource = c.resource
                      AND r.occurred_at >= c.window_start AND r.occurred_at >= %s
                      AND r.usage_record_id NOT LIKE 'ur_hist_%%'
                      AND r.occurred_at < c.window_start + CASE c.period
                          WHEN 'daily' THEN interval '1 day' ELSE interval '1 month' END
                ) r ON true
                WHERE c.tenant_id LIKE 'bench-%%'
                """,
                (since,),
            )
            row = await cur.fetchone()
            assert row is not None
            cur = await conn.execute(
                "SELECT balance_micros - (SELECT sum(delta_micros) FROM wallet_ledger"
                " WHERE tenant_id = %s) FROM wallets WHERE tenant_id = %s",
                (HOT, HOT),
            )
            wallet = await cur.fetchone()
    finally:
        await pool.close()
    return {
        "windows_not_matching_records": int(row[0]),
        "windows_over_limit": int(row[1]),
        "wallet_off_ledger_micros": int(wallet[0]) if wallet and wallet[0] is not None else 0,
    }


def _point(results: list[Result], server: str, scenario: str, n: int) -> Result | None:
    return next(
        (r for r in results
         if r.server == server and r.scenario == scenario and r.in_flight == n), None
    )  # fmt: skip


def _ratios(results: list[Result]) -> list[tuple[str, float | None, str, float, bool]]:
    """(measure, value, target text, bound, higher is better) from one round's results."""

    def get(server: str, scenario: str, n: int) -> Result | None:  # a point of this round
        return _point(results, server, scenario, n)

    rows: list[tuple[str, float | None, str, float, bool]] = []
    for scen in ("hot", "10k-uniform"):
        s, e = get("sidecar", scen, 64), get("echo", scen, 64)
        v = s.calls_per_s / e.calls_per_s if s and e else None
        rows.append((f"calls/s ÷ echo, 64 in flight, {scen}", v, "≥ 0.8", 0.8, True))
    s, t = get("sidecar", "hot", 64), get("textbook", "hot", 64)
    v = s.calls_per_s / t.calls_per_s if s and t else None
    rows.append(("calls/s ÷ textbook, hot, 64 in flight", v, "≥ 3", 3, True))
    s, e = get("sidecar", "hot", 1), get("echo", "hot", 1)
    v = s.p50_ms / e.p50_ms if s and e else None
    rows.append(("p50 ÷ echo p50, 1 in flight", v, "≤ 2.5", 2.5, False))
    h, u = get("sidecar", "hot", 64), get("sidecar", "10k-uniform", 64)
    v = h.p99_ms / u.p99_ms if h and u else None
    rows.append(("hot p99 ÷ 10k p99, 64 in flight", v, "≤ 1.5", 1.5, False))
    h2, h0 = get("sidecar", "history", 64), get("sidecar", "hot", 64)
    v = h2.calls_per_s / h0.calls_per_s if h2 and h0 else None
    rows.append(("calls/s with history ÷ without", v, "≥ 0.9", 0.9, True))
    return rows


def _lone_call_ratios(results: list[Result]) -> list[tuple[str, float | None]]:
    """What bounds the p50 target from below, from one round: each floor's and the
    textbook's p50 against echo's, and the sidecar's against the two-round-trip floor's."""
    p50 = {}
    for server in ("echo", "textbook", "sidecar", *FLOORS):
        found = _point(results, server, "hot", 1)
        p50[server] = found.p50_ms if found else None

    def ratio(a: str, b: str) -> float | None:
        x, y = p50[a], p50[b]
        return x / y if x is not None and y else None

    rows = [(f"{r} p50 ÷ echo p50, 1 in flight", ratio(r, "echo")) for r in (*FLOORS, "textbook")]
    rows.append((f"sidecar p50 ÷ {FLOORS[1]} p50, 1 in flight", ratio("sidecar", FLOORS[1])))
    return rows


def _over_rounds(per_round: list[list[tuple[Any, ...]]]) -> list[dict[str, Any]]:
    """Rows of (measure, value, …) from each round as one row each: the median of the
    rounds' values, and the values."""
    rows = []
    for i, (name, *_) in enumerate(per_round[0]):
        values = [v for r in per_round if (v := r[i][1]) is not None]
        value = statistics.median(values) if values else None
        rows.append({"measure": name, "value": value, "rounds": values})
    return rows


def references(rounds: list[list[Result]]) -> list[dict[str, Any]]:
    """The lone-call ratios (no targets) as medians of their per-round values."""
    return _over_rounds([_lone_call_ratios(results) for results in rounds])


def ratios(rounds: list[list[Result]]) -> list[dict[str, Any]]:
    """Each target as the median of its per-round values (the rounds are listed too)."""
    per_round = [_ratios(results) for results in rounds]
    rows = _over_rounds(per_round)
    for row, (_, _, target, bound, higher) in zip(rows, per_round[0], strict=True):
        value = row["value"]
        row["target"] = target
        row["met"] = value is not None and (value >= bound if higher else value <= bound)
    return rows


def combine(runs: list[Result]) -> Result:
    """One point over the rounds: medians, the highest RSS, all errors."""
    first = runs[0]
    return Result(
        first.server,
        first.scenario,
        first.in_flight,
        statistics.median(r.calls_per_s for r in runs),
        statistics.median(r.p50_ms for r in runs),
        statistics.median(r.p99_ms for r in runs),
        statistics.median(r.p999_ms for r in runs),
        statistics.median(r.cpu_ms_per_call for r in runs),
        max(r.peak_rss_mb for r in runs),
        sum(r.errors for r in runs),
        {"calls_per_s_by_round": [round(r.calls_per_s) for r in runs]},
        statistics.median(r.db_cpu_ms_per_call for r in runs),
        statistics.median(r.load_cpu_ms_per_call for r in runs),
    )


def cpu_budget(results: list[Result]) -> list[str]:
    """What the CPU per call allows, whatever the scheduling: a call costs the machine the
    server's CPU, PostgreSQL's and the load process's; on the CPU the echo run used, the
    sidecar can reach at most the ratio of the two costs of the echo server's calls/s."""

    def parts(r: Result) -> tuple[float, str]:
        total = r.cpu_ms_per_call + r.db_cpu_ms_per_call + r.load_cpu_ms_per_call
        return total, (
            f"{total:.3f} ms (server {r.cpu_ms_per_call:.3f}, PostgreSQL "
            f"{r.db_cpu_ms_per_call:.3f}, load {r.load_cpu_ms_per_call:.3f})"
        )

    lines = []
    for scen in ("hot", "10k-uniform"):
        found = {r.server: r for r in results if r.scenario == scen and r.in_flight == 64}
        if "echo" in found and "sidecar" in found:
            (echo_ms, echo), (side_ms, side) = parts(found["echo"]), parts(found["sidecar"])
            lines.append(
                f"CPU per call at 64 in flight, {scen}: echo {echo}, sidecar {side} → on the "
                f"CPU the echo run used, at most {echo_ms / side_ms:.2f} of its calls/s."
            )
    return lines


def _cells(row: dict[str, Any]) -> str:
    """A row's measure, value and per-round values as table cells."""
    value = "—" if row["value"] is None else f"{row['value']:.2f}"
    each = " / ".join(f"{v:.2f}" for v in row["rounds"]) or "—"
    return f"{row['measure']} | {value} | {each}"


def markdown(
    results: list[Result],
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    lone: list[dict[str, Any]],
) -> str:
    lines = [
        f"Measured {meta['at']} on {meta['cpus']} CPUs, PostgreSQL: {meta['database']}; "
        f"{meta['rounds']} rounds of {meta['seconds']} s per point (figures: the median over "
        f"the rounds; ratios: the median of the per-round ratios); "
        f"{meta['history_rows']:,} historic records (in a second database, with a sidecar "
        f"of its own, measured right after the hot point; loaded in "
        f"{meta.get('history_insert_s', 0)} s).",
        "",
        "| measure | value | per round | target | met |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        met = "—" if row["value"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {_cells(row)} | {row['target']} | {met} |")
    lines += ["", "| what a lone call costs (no target) | value | per round |", "|---|---|---|"]
    lines += [f"| {_cells(row)} |" for row in lone]
    lines += [
        "",
        "| server | scenario | in flight | calls/s | p50 ms | p99 ms | p99.9 ms "
        "| server CPU ms/call | PostgreSQL CPU ms/call | load CPU ms/call "
        "| peak RSS MB | denied/errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.server} | {r.scenario} | {r.in_flight} | {r.calls_per_s:,.0f} | "
            f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.p999_ms:.2f} | {r.cpu_ms_per_call:.3f} | "
            f"{r.db_cpu_ms_per_call:.3f} | {r.load_cpu_ms_per_call:.3f} | "
            f"{r.peak_rss_mb:.0f} | {r.errors} |"
        )
    lines += ["", *cpu_budget(results)]
    lines += ["", f"Correctness: {json.dumps(meta['correctness'])}"]
    return "\n".join(lines) + "\n"


def chart(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at64 = [r for r in results if r.in_flight == 64]
    # short lines, so neighbouring labels do not run into each other
    labels = ["\n".join((r.server.replace(" (", "\n("), r.scenario.replace(", ", ",\n")))
              for r in at64]  # fmt: skip
    fig, ax = plt.subplots(figsize=(max(6, len(at64) * 1.2), 4))
    ax.bar(range(len(at64)), [r.calls_per_s for r in at64], color="#4c72b0")
    ax.set_xticks(range(len(at64)), labels, fontsize=7)
    ax.set_ylabel("calls/s (64 in flight)")
    ax.set_title(
        "Throughput, same run, same machine (CheckAndConsume; a Reserve + Commit pair counts once)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
    rounds: list[list[Result]] = [[] for _ in range(cfg.rounds)]
    started = datetime.now(UTC)
    try:
        for db in (url, history_url):
            upgrade(db)
            asyncio.run(seed(db, cfg))
        history_s = asyncio.run(add_history(history_url, cfg.history_rows))
        plan = [
            ("echo", ["hot", "10k-uniform"]),
            ("textbook", ["hot"]),
            *((floor, ["hot"]) for floor in FLOORS),
            ("sidecar", ["hot", "10k-uniform", "zipf", RESERVE_COMMIT]),
            ("sidecar (no coalescing)", ["hot", RESERVE_COMMIT]),
        ]
        points: list[tuple[Server, str, int]] = []
        for server_name, scenarios in plan:
            if server_name.startswith("sidecar"):
                server = start_sidecar(url, coalesce=server_name == "sidecar")
            else:
                server = start_reference(server_name, url)
            servers.append(server)
            for scenario in scenarios:
                for n in cfg.in_flight:
                    if server_name != "sidecar" and n == 8:
                        continue  # the references at 1 and 64 are what the ratios use
                    if server_name in FLOORS and n != 1:
                        continue  # a floor bounds the latency of a lone call
                    if scenario == RESERVE_COMMIT and n == 8:
                        continue
                    points.append((server, scenario, n))
        # a sidecar of its own on the database with the history, measured right after the
        # other sidecar's last hot point (64 in flight)
        historian = start_sidecar(history_url, coalesce=True)
        servers.append(historian)
        hot = max(i for i, (s, sc, _) in enumerate(points) if s.name == "sidecar" and sc == "hot")
        points.insert(hot + 1, (historian, "history", 64))
        vacuum(url)
        vacuum(history_url)
        for i, results in enumerate(rounds):
            for j, (server, scenario, n) in enumerate(points):
                results.append(drive(server, scenario, n, cfg))
                print(f"  round {i + 1}  {server.name:24} {scenario:12} {n:3} in flight: "
                      f"{results[-1].calls_per_s:8,.0f} calls/s", flush=True)  # fmt: skip
                if j + 1 == len(points) or points[j + 1][0] is not server:
                    # the next server starts where this one did: no cleanup mid-measurement
                    vacuum(history_url if server is historian else url)
        for server in servers:
            server.stop()
        books = [asyncio.run(check_books(db, started)) for db in (url, history_url)]
        correctness = {key: sum(abs(b[key]) for b in books) for key in books[0]}
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.stop()
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
        "correctness": correctness,
    }
    rows, lone = ratios(rounds), references(rounds)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "meta": meta,
        "targets": rows,
        "lone_call": lone,
        "results": [r.__dict__ for r in results],
    }
    (out / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown(results, rows, meta, lone)
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
            seconds=0.3, warmup=0.1, history_rows=2_000, tenants=200, in_flight=(1, 8), rounds=2
        )
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
