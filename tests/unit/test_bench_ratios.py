"""`make bench` reports each target as the median of per-round ratios, and each point as the
median over its rounds: a drift of the machine between rounds cannot pair a fast echo
round with a slow sidecar round."""

from __future__ import annotations

from bench.report import FLOORS, Result, combine, cpu_budget, ratios, references


def point(
    server: str, scenario: str, n: int, calls: float, p50: float = 1.0, cpu: float = 0.5
) -> Result:
    return Result(server, scenario, n, calls, p50, 10.0, 20.0, cpu, 60.0, 0)


def one_round(
    echo: float, sidecar: float, echo_cpu: float = 0.5, cpu: float = 0.75
) -> list[Result]:
    return [
        point("echo", "hot", 64, echo, cpu=echo_cpu),
        point("sidecar", "hot", 64, sidecar, cpu=cpu),
        point("echo", "hot", 1, 1000, p50=0.5),
        point(FLOORS[1], "hot", 1, 700, p50=1.0),
        point("sidecar", "hot", 1, 300, p50=2.0),
    ]


def test_ratios_are_medians_of_per_round_ratios() -> None:
    # the machine slows down in round 2: both servers need twice the CPU per call
    rounds = [one_round(4000, 2000), one_round(2000, 1000, 0.5, 0.75), one_round(4000, 2400)]
    rows = {row["measure"]: row for row in ratios(rounds)}
    cpu = rows["server CPU per call ÷ echo's, 64 in flight, hot"]
    assert cpu["rounds"] == [1.5, 1.5, 1.5]
    assert cpu["value"] == 1.5 and not cpu["met"]
    # per-round ratios 1.5, 1.0 and 3.0; the ratio of the medians would be 0.75 / 0.25
    skewed = [one_round(1, 1, 0.5, 0.75), one_round(1, 1, 0.75, 0.75), one_round(1, 1, 0.25, 0.75)]
    assert {r["measure"]: r for r in ratios(skewed)}[cpu["measure"]]["value"] == 1.5
    p50 = rows[f"sidecar p50 ÷ {FLOORS[1]} p50, 1 in flight"]
    assert p50["value"] == 2.0 and not p50["met"]
    missing = rows["calls/s ÷ textbook, hot, 64 in flight"]
    assert missing["value"] is None and missing["rounds"] == [] and not missing["met"]


def test_a_target_within_its_bound_is_met() -> None:
    fast = one_round(4000, 3000, echo_cpu=0.2, cpu=0.25)
    fast[-1] = point("sidecar", "hot", 1, 700, p50=1.2)  # 1.2 times the floor's 1.0
    rows = {row["measure"]: row for row in ratios([fast])}
    assert rows[f"sidecar p50 ÷ {FLOORS[1]} p50, 1 in flight"]["met"]
    assert rows["server CPU per call ÷ echo's, 64 in flight, hot"]["met"]


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


def test_the_reference_ratios_compare_round_by_round() -> None:
    def lone(echo: float, floor1: float, floor2: float, sidecar: float) -> list[Result]:
        return [
            point("echo", "hot", 1, 1000, p50=echo),
            point(FLOORS[0], "hot", 1, 500, p50=floor1),
            point(FLOORS[1], "hot", 1, 400, p50=floor2),
            point("sidecar", "hot", 1, 300, p50=sidecar),
            point("sidecar", "hot", 64, 2000, p50=30.0),  # not a lone call
            point("echo", "hot", 64, 4000, p50=8.0),
        ]

    rows = {
        r["measure"]: r for r in references([lone(0.5, 1.0, 1.5, 3.0), lone(1.0, 1.5, 2.0, 3.0)])
    }
    assert rows["floor (1 round trip) p50 ÷ echo p50, 1 in flight"]["rounds"] == [2.0, 1.5]
    assert rows["floor (2 round trips) p50 ÷ echo p50, 1 in flight"]["value"] == 2.5
    assert rows["sidecar p50 ÷ echo p50, 1 in flight"]["rounds"] == [6.0, 3.0]
    assert rows["calls/s ÷ echo, 64 in flight, hot"]["value"] == 0.5
    textbook = rows["textbook p50 ÷ echo p50, 1 in flight"]  # not measured in these rounds
    assert textbook["value"] is None and textbook["rounds"] == []
