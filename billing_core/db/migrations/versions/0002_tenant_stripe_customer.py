"""tenants.stripe_customer_id

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 03:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tenants", sa.Column("stripe_customer_id", sa.String(length=255), nullable=True))
    op.create_unique_constraint(
        op.f("uq_tenants_stripe_customer_id"), "tenants", ["stripe_customer_id"]
    )


def downgrade() -> None:
    op.drop_constraint(op.f("uq_tenants_stripe_customer_id"), "tenants", type_="unique")
    op.drop_column("tenants", "stripe_customer_id")
