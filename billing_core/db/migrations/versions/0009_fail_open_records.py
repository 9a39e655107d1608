"""usage_records.kind 'fail_open': usage a client allowed while the sidecar could not be
reached, counted afterwards by ReportUsage

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 22:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint(op.f("ck_usage_records_kind_known"), "usage_records", type_="check")
    op.create_check_constraint(
        "kind_known", "usage_records", "kind IN ('consume','commit','free','fail_open')"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_usage_records_kind_known"), "usage_records", type_="check")
    op.create_check_constraint("kind_known", "usage_records", "kind IN ('consume','commit','free')")
