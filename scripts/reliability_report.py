"""`make reliability`'s table: read the figures the fault, storm and fuzz tests wrote (one
JSON object per line), print one table and write it, with how it was made, to a Markdown
file. Exits 1 when a figure that must be zero is not."""

from __future__ import annotations

import json
import platform
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MUST_BE_ZERO = ("lost", "counted_twice", "applied_twice")
HEADER = (
    "| suite | load held | faults injected and survived | bad inputs tried | units lost"
    " | units counted twice | effects applied twice | longest answer during an outage |"
)


def _row(r: dict[str, Any]) -> str:
    load = f"{r['load']:,} {r.get('load_unit', '')}".strip() if "load" in r else "-"
    outage = f"{r['longest_outage_answer_ms']:,} ms" if "longest_outage_answer_ms" in r else "-"
    cells = [
        r["suite"],
        load,
        f"{r['faults']:,}" if "faults" in r else "-",
        f"{r['bad_inputs']:,}" if "bad_inputs" in r else "-",
        *(str(r.get(k, 0)) for k in MUST_BE_ZERO),
        outage,
    ]
    return "| " + " | ".join(cells) + " |"


def render(rows: list[dict[str, Any]], scale: str, seconds: str) -> str:
    table = [HEADER, "|" + "---|" * 8, *(_row(r) for r in rows)]
    notes = [f"- **{r['suite']}**: {r['notes']}" for r in rows if r.get("notes")]
    return "\n".join(
        [
            "# Reliability",
            "",
            "Written by `make reliability`: the fault, storm and fuzz suites of `tests/` run",
            f"with `RELIABILITY_SCALE={scale}` (`make test` runs each at scale 1) against real",
            "processes, a real PostgreSQL and real gRPC, on "
            f"{platform.machine()} with {_cores()} cores, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
            f" ({seconds} s). Units lost, counted twice and effects applied twice must be 0.",
            "",
            *table,
            "",
            "What each suite did:",
            "",
            *notes,
            "",
        ]
    )


def _cores() -> int:
    import os

    return os.cpu_count() or 1


def main(argv: list[str]) -> int:
    source, target = Path(argv[1]), Path(argv[2])
    scale = argv[3] if len(argv) > 3 else "?"
    seconds = argv[4] if len(argv) > 4 else "?"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    if not rows:
        print("no figures were written: did the suites run?", file=sys.stderr)
        return 1
    text = render(rows, scale, seconds)
    target.write_text(text)
    print(text)
    bad = [r["suite"] for r in rows if any(r.get(k, 0) for k in MUST_BE_ZERO)]
    if bad:
        print(f"NOT ZERO: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
