"""A usage chart drawn on the server: one SVG bar per day, no chart service, no script."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import date, timedelta
from html import escape

from markupsafe import Markup

WIDTH, HEIGHT, GAP = 600, 120, 2


def daily_bars(
    title: str,
    days: Sequence[tuple[date, int]],
    first: date,
    count: int,
    label: str,
    day_name: Callable[[date], str] = date.isoformat,
) -> Markup:
    """`count` days from `first`; a day missing from `days` had no usage. The bars carry
    their day (as `day_name` writes it) and amount as a tooltip, and the picture its
    summary as an accessible name."""
    by_day = dict(days)
    values = [by_day.get(first + timedelta(n), 0) for n in range(count)]
    top = max(max(values), 1)
    bar = WIDTH / count
    total = sum(values)
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT + 16}" role="img" '
        f'aria-label="{escape(title)}: {total:,} {escape(label)} in {count} days" '
        'preserveAspectRatio="none" xmlns="http://www.w3.org/2000/svg">',
        f'<line x1="0" y1="{HEIGHT}" x2="{WIDTH}" y2="{HEIGHT}" class="axis"/>',
    ]
    for n, value in enumerate(values):
        height = round(value / top * (HEIGHT - 4), 1) if value > 0 else 0
        day = first + timedelta(n)
        parts.append(
            f'<rect x="{n * bar + GAP / 2:.1f}" y="{HEIGHT - height}" width="{bar - GAP:.1f}" '
            f'height="{height}"><title>{escape(day_name(day))}: {value:,} {escape(label)}'
            "</title></rect>"
        )
    parts.append(
        f'<text x="0" y="{HEIGHT + 13}" class="tick">{escape(day_name(first))}</text>'
        f'<text x="{WIDTH}" y="{HEIGHT + 13}" class="tick end">'
        f"{escape(day_name(first + timedelta(count - 1)))}</text></svg>"
    )
    return Markup("".join(parts))  # noqa: S704 - every value above is escaped or a number
