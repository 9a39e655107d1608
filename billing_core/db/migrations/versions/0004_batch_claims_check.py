"""quota_expect_claims: a batch's write statement fails when a request_id was taken meanwhile

A coalesced batch writes its idempotency keys and commits in one round trip. When another
transaction took one of the keys first, fewer keys are written than asked; this function
turns that into an error (SQLSTATE QB001) inside the same statement, so the statement — and
with it the whole transaction, whose COMMIT is already on its way — is rolled back.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION quota_expect_claims(expected bigint, taken bigint) RETURNS bigint
        LANGUAGE plpgsql AS $$
        BEGIN
            IF taken <> expected THEN
                RAISE EXCEPTION 'only % of % request_ids could be taken', taken, expected
                    USING ERRCODE = 'QB001';
            END IF;
            RETURN taken;
        END
        $$
        """
    )


def downgrade() -> None:
    op.execute("DROP FUNCTION quota_expect_claims(bigint, bigint)")
