"""`make bench` reports each target as the median of per-round ratios, and each point as the
median over its rounds: a drift of the machine between rounds cannot pair a fast echo
round with a slow sidecar round."""

from __future__ import annotations

from bench.__main__ import Result, combine, cpu_budget, ratios


def point(server: str, scenario: str, n: int, calls: float, p50: float = 1.0) -> Result:
    return Result(server, scenario, n, calls, p50, 10.0, 20.0, 0.5, 60.0, 0)


def one_round(echo: float, sidecar: float) -> list[Result]:
    return [
        point("echo", "hot", 64, echo),
        point("sidecar", "hot", 64, sidecar),
        point("echo", "hot", 1, 1000, p50=0.5),
        point("sidecar", "hot", 1, 300, p50=2.0),
    ]


def test_ratios_are_medians_of_per_round_ratios() -> None:
    # the machine slows down in round 2: both servers lose half their speed
    rounds = [one_round(4000, 2000), one_round(2000, 1000), one_round(4000, 2400)]
    rows = {row["measure"]: row for row in ratios(rounds)}
    hot = rows["calls/s ÷ echo, 64 in flight, hot"]
    assert hot["rounds"] == [0.5, 0.5, 0.6]
    assert hot["value"] == 0.5 and not hot["met"]
    # per-round ratios 0.5, 0.95 and 0.33; the ratio of the medians would be 1900 / 3000
    skewed = [one_round(4000, 2000), one_round(2000, 1900), one_round(3000, 1000)]
    assert {r["measure"]: r for r in ratios(skewed)}[hot["measure"]]["value"] == 0.5
    p50 = rows["p50 ÷ echo p50, 1 in flight"]
    assert p50["value"] == 4.0 and not p50["met"]
    missing = rows["calls/s ÷ textbook, hot, 64 in flight"]
    assert missing["value"] is None and missing["rounds"] == [] and not missing["met"]


def test_a_point_is_the_median_of_its_rounds() -> None:
    runs = [point("sidecar", "hot", 64, c) for c in (900.0, 2000.0, 1500.0)]
    runs[1].errors = 2
    combined = combine(runs)
    assert combined.calls_per_s == 1500.0 and combined.errors == 2
    assert combined.extra["calls_per_s_by_round"] == [900, 2000, 1500]


def test_the_cpu_budget_bounds_the_throughput_ratio() -> None:
    echo = point("echo", "hot", 64, 4000)
    echo.cpu_ms_per_call, echo.load_cpu_ms_per_call = 0.25, 0.25
    side = point("sidecar", "hot", 64, 2000)
    side.cpu_ms_per_call, side.db_cpu_ms_per_call, side.load_cpu_ms_per_call = 0.5, 0.25, 0.25
    [line] = cpu_budget([echo, side, point("sidecar", "10k-uniform", 64, 1800)])
    assert line.startswith("CPU per call at 64 in flight, hot: echo 0.500 ms (server 0.250,")
    assert "sidecar 1.000 ms (server 0.500, PostgreSQL 0.250, load 0.250)" in line
    assert line.endswith("at most 0.50 of its calls/s.")
