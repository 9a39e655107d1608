"""The bench's arithmetic and its reports: a point over the rounds, the targets as medians
of per-round ratios, what a lone call costs against the floors, the CPU budget, and the
markdown table and chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLOORS = ("floor (1 round trip)", "floor (2 round trips)")
# the hot tenant's Reserve followed by the Commit of its reservation: one point is one pair
# (by both sidecars: what coalescing them gives, in the same run)
RESERVE_COMMIT = "hot, reserve+commit"
# scale-out and deployment variants of the sidecar, each against the one sidecar
SIDECARS_3 = "3 sidecars, one database"
THROUGH_PGBOUNCER = "sidecar via PgBouncer"
CUSTOM_PLANS = "sidecar, DB_GENERIC_PLANS=off"


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


def _point(results: list[Result], server: str, scenario: str, n: int) -> Result | None:
    return next(
        (r for r in results
         if r.server == server and r.scenario == scenario and r.in_flight == n), None
    )  # fmt: skip


def _ratios(results: list[Result]) -> list[tuple[str, float | None, str, float, bool]]:
    """(measure, value, target text, bound, higher is better) from one round's results."""

    def ratio(a: Result | None, b: Result | None, of: str) -> float | None:
        x, y = (getattr(a, of), getattr(b, of)) if a and b else (None, None)
        return x / y if x is not None and y else None

    def get(server: str, scenario: str, n: int) -> Result | None:  # a point of this round
        return _point(results, server, scenario, n)

    lone, floor = get("sidecar", "hot", 1), get(FLOORS[1], "hot", 1)
    hot, echo = get("sidecar", "hot", 64), get("echo", "hot", 64)
    return [
        (f"sidecar p50 ÷ {FLOORS[1]} p50, 1 in flight", ratio(lone, floor, "p50_ms"),
         "≤ 1.3", 1.3, False),
        ("server CPU per call ÷ echo's, 64 in flight, hot",
         ratio(hot, echo, "cpu_ms_per_call"), "≤ 1.3", 1.3, False),
        ("calls/s ÷ textbook, hot, 64 in flight",
         ratio(hot, get("textbook", "hot", 64), "calls_per_s"), "≥ 3", 3, True),
        ("hot p99 ÷ 10k p99, 64 in flight",
         ratio(hot, get("sidecar", "10k-uniform", 64), "p99_ms"), "≤ 1.5", 1.5, False),
        ("calls/s with history ÷ without",
         ratio(get("sidecar", "history", 64), hot, "calls_per_s"), "≥ 0.9", 0.9, True),
        ("billing overview server time, history ÷ no records (p50)",
         ratio(get("control plane", "overview, history", 1),
               get("control plane", "overview, no records", 1), "p50_ms"), "≤ 1.5", 1.5, False),
    ]  # fmt: skip


def _reference_ratios(results: list[Result]) -> list[tuple[str, float | None]]:
    """What the machine and the stack allow, from one round (no targets): throughput
    against the echo server's, and each lone call's p50 against echo's."""
    rows: list[tuple[str, float | None]] = []
    for scen in ("hot", "10k-uniform"):
        s, e = _point(results, "sidecar", scen, 64), _point(results, "echo", scen, 64)
        rows.append((f"calls/s ÷ echo, 64 in flight, {scen}",
                     s.calls_per_s / e.calls_per_s if s and e else None))  # fmt: skip
    echo = _point(results, "echo", "hot", 1)
    for server in (*FLOORS, "textbook", "sidecar"):
        found = _point(results, server, "hot", 1)
        value = found.p50_ms / echo.p50_ms if found and echo and echo.p50_ms else None
        rows.append((f"{server} p50 ÷ echo p50, 1 in flight", value))
    # what several sidecars, a pooler and plans made per statement cost or give
    alone = _point(results, "sidecar", "hot", 1)
    for server, scen, n in (
        (SIDECARS_3, "hot", 64),
        (SIDECARS_3, "10k-uniform", 64),
        (THROUGH_PGBOUNCER, "hot", 64),
        (CUSTOM_PLANS, "hot", 64),
    ):
        found, base = _point(results, server, scen, n), _point(results, "sidecar", scen, n)
        rows.append((f"calls/s {server} ÷ one sidecar, {n} in flight, {scen}",
                     found.calls_per_s / base.calls_per_s if found and base else None))  # fmt: skip
    for server in (THROUGH_PGBOUNCER, CUSTOM_PLANS):
        found = _point(results, server, "hot", 1)
        value = found.p50_ms / alone.p50_ms if found and alone and alone.p50_ms else None
        rows.append((f"{server} p50 ÷ sidecar p50, 1 in flight", value))
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
    """The reference ratios (no targets) as medians of their per-round values."""
    return _over_rounds([_reference_ratios(results) for results in rounds])


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
    reference_rows: list[dict[str, Any]],
) -> str:
    lines = [
        f"Measured {meta['at']} on {meta['cpus']} CPUs, PostgreSQL: {meta['database']}; "
        f"{meta['rounds']} rounds of {meta['seconds']} s per point (figures: the median over "
        f"the rounds; ratios: the median of the per-round ratios); "
        f"{meta['history_rows']:,} historic records (in a second database, with a sidecar "
        f"of its own, measured right after the hot point; loaded in "
        f"{meta.get('history_insert_s', 0)} s); the billing overview of a tenant with "
        f"{meta.get('page_rows', 0):,} records against one with none, "
        f"{meta.get('page_renders', 0)} views of each per round (server time from "
        "Server-Timing).",
        "",
        "| measure | value | per round | target | met |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        met = "—" if row["value"] is None else ("yes" if row["met"] else "**no**")
        lines.append(f"| {_cells(row)} | {row['target']} | {met} |")
    lines += ["", "| for reference (no target) | value | per round |", "|---|---|---|"]
    lines += [f"| {_cells(row)} |" for row in reference_rows]
    lines += [
        "",
        "| server | scenario | in flight | calls/s | p50 ms | p99 ms | p99.9 ms "
        "| server CPU ms/call | PostgreSQL CPU ms/call | load CPU ms/call "
        "| peak RSS MB | denied/errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        # the pages' points measure time only (their CPU and memory are not taken)
        machine = (
            f"{r.cpu_ms_per_call:.3f} | {r.db_cpu_ms_per_call:.3f} | "
            f"{r.load_cpu_ms_per_call:.3f} | {r.peak_rss_mb:.0f}"
            if r.peak_rss_mb
            else "— | — | — | —"
        )
        lines.append(
            f"| {r.server} | {r.scenario} | {r.in_flight} | {r.calls_per_s:,.0f} | "
            f"{r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.p999_ms:.2f} | {machine} | {r.errors} |"
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
