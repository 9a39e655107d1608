"""ix_wallet_grants_due: the sweep finds grants past their expiry without reading them all

A grant past its expiry keeps paying nothing, but until it is marked expired its tenant's
calls cannot be decided set-based by a coalesced batch (quota_batch.py). The sidecar's
sweep marks such grants; this partial index leads it to them (the live grants only, not
every grant ever given). It is led by tenant_id: led by expires_at, a generic plan cached
while the tables were small used it for one tenant's grants and read every live grant's
entry (tests/integration/test_batch_plans.py caught it on PostgreSQL 15).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 22:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_wallet_grants_due",
        "wallet_grants",
        ["tenant_id", "expires_at"],
        postgresql_where=sa.text("NOT expired"),
    )


def downgrade() -> None:
    op.drop_index("ix_wallet_grants_due", table_name="wallet_grants")
