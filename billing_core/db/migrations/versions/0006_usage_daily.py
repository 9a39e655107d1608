"""usage_daily: completed days of usage per tenant and resource, for charts

A chart of the last 30 days reads at most 30 rows a resource here, and only today's
records, never a tenant's history; a day is summed from its records the first time a chart
asks for it (records never change once written).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 20:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_daily",
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("resource", sa.String(72), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "resource", "day", name="pk_usage_daily"),
    )


def downgrade() -> None:
    op.drop_table("usage_daily")
