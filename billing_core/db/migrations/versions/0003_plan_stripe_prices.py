"""plan_stripe_prices: every provider price a plan was sold at

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25 03:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "plan_stripe_prices",
        sa.Column("stripe_price_id", sa.String(length=255), nullable=False),
        sa.Column("plan_id", sa.String(length=64), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["plans.plan_id"], name=op.f("fk_plan_stripe_prices_plan_id_plans")
        ),
        sa.PrimaryKeyConstraint("stripe_price_id", name=op.f("pk_plan_stripe_prices")),
    )
    op.create_index(
        op.f("ix_plan_stripe_prices_plan_id"), "plan_stripe_prices", ["plan_id"], unique=False
    )
    # prices already on plans are part of the history
    op.execute(
        "INSERT INTO plan_stripe_prices (stripe_price_id, plan_id)"
        " SELECT stripe_price_id, plan_id FROM plans WHERE stripe_price_id IS NOT NULL"
        " ON CONFLICT DO NOTHING"
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_plan_stripe_prices_plan_id"), table_name="plan_stripe_prices")
    op.drop_table("plan_stripe_prices")
