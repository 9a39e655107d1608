"""usage_daily_marks: how far each day of a tenant's usage is summed into usage_daily

A day's rows in usage_daily hold its records from the day's start up to the day's mark;
a day that is over has its end as its mark. Today is summed as it goes (up to ten minutes
ago), so a chart reads only the last minutes' records besides these rows. The marker rows
for empty days (resource '') that usage_daily held before are replaced by the marks.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 21:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_daily_marks",
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("summed_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "day", name="pk_usage_daily_marks"),
    )
    # the days summed so far start over (they are summed again from their records)
    op.execute("DELETE FROM usage_daily")


def downgrade() -> None:
    op.drop_table("usage_daily_marks")
    op.execute("DELETE FROM usage_daily")
