"""api_keys.scope: an admin key may do everything, a read key only read

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 21:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "api_keys", sa.Column("scope", sa.String(16), server_default="admin", nullable=False)
    )
    op.create_check_constraint("scope_known", "api_keys", "scope IN ('admin','read')")


def downgrade() -> None:
    op.drop_constraint(op.f("ck_api_keys_scope_known"), "api_keys", type_="check")
    op.drop_column("api_keys", "scope")
