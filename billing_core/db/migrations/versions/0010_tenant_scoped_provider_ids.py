"""Every unique constraint of a tenant's rows includes tenant_id (ready to distribute by
tenant): a provider's subscription id is unique within its tenant, and the customer →
tenant lookup moves from a unique column of tenants to provider_customers

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-08 02:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "provider_customers",
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=False),
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.PrimaryKeyConstraint("stripe_customer_id", name=op.f("pk_provider_customers")),
    )
    op.execute(
        "INSERT INTO provider_customers (stripe_customer_id, tenant_id)"
        " SELECT stripe_customer_id, tenant_id FROM tenants WHERE stripe_customer_id IS NOT NULL"
    )
    op.drop_constraint(op.f("uq_tenants_stripe_customer_id"), "tenants", type_="unique")
    op.drop_constraint(
        op.f("uq_subscriptions_stripe_subscription_id"), "subscriptions", type_="unique"
    )
    op.create_unique_constraint(
        op.f("uq_subscriptions_tenant_id_stripe_subscription_id"),
        "subscriptions",
        ["tenant_id", "stripe_subscription_id"],
    )


def downgrade() -> None:
    op.drop_constraint(
        op.f("uq_subscriptions_tenant_id_stripe_subscription_id"), "subscriptions", type_="unique"
    )
    op.create_unique_constraint(
        op.f("uq_subscriptions_stripe_subscription_id"), "subscriptions", ["stripe_subscription_id"]
    )
    op.create_unique_constraint(
        op.f("uq_tenants_stripe_customer_id"), "tenants", ["stripe_customer_id"]
    )
    op.drop_table("provider_customers")
