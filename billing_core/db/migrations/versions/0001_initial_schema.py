"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-25 01:27:36.047285
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


APPEND_ONLY_TABLES = ("usage_records", "wallet_ledger", "audit_log")


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("key_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("api_key_id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("key_hash", name=op.f("uq_api_keys_key_hash")),
    )
    op.create_table(
        "audit_log",
        sa.Column("audit_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("entity_type", sa.String(length=64), nullable=False),
        sa.Column("entity_id", sa.String(length=255), nullable=False),
        sa.Column("before", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("after", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("audit_id", name=op.f("pk_audit_log")),
    )
    op.create_index("ix_audit_log_entity", "audit_log", ["entity_type", "entity_id"], unique=False)
    op.create_table(
        "http_idempotency_keys",
        sa.Column("api_key_id", sa.String(length=40), nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("response_body", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint(
            "api_key_id", "idempotency_key", name=op.f("pk_http_idempotency_keys")
        ),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("operation", sa.String(length=16), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("response", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "request_id", name=op.f("pk_idempotency_keys")),
    )
    op.create_index(
        "ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"], unique=False
    )
    op.create_table(
        "model_prices",
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=128), nullable=False),
        sa.Column("effective_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("input_micros_per_million", sa.BigInteger(), nullable=False),
        sa.Column("output_micros_per_million", sa.BigInteger(), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "input_micros_per_million >= 0", name=op.f("ck_model_prices_input_nonnegative")
        ),
        sa.CheckConstraint(
            "output_micros_per_million >= 0", name=op.f("ck_model_prices_output_nonnegative")
        ),
        sa.PrimaryKeyConstraint(
            "provider", "model", "effective_from", name=op.f("pk_model_prices")
        ),
    )
    op.create_table(
        "notifications",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("notification_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("dedupe_key", sa.String(length=255), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column(
            "details",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "notification_id", name=op.f("pk_notifications")),
        sa.UniqueConstraint(
            "tenant_id", "dedupe_key", name=op.f("uq_notifications_tenant_id_dedupe_key")
        ),
    )
    op.create_index(
        "ix_notifications_tenant_created",
        "notifications",
        ["tenant_id", "created_at"],
        unique=False,
    )
    op.create_table(
        "plans",
        sa.Column("plan_id", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), server_default="", nullable=False),
        sa.Column("price_cents", sa.BigInteger(), nullable=False),
        sa.Column("currency", sa.String(length=3), server_default="usd", nullable=False),
        sa.Column("interval", sa.String(length=8), server_default="month", nullable=False),
        sa.Column("stripe_price_id", sa.String(length=255), nullable=True),
        sa.Column("stripe_product_id", sa.String(length=255), nullable=True),
        sa.Column("active", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("trial", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("trial_days", sa.Integer(), server_default="0", nullable=False),
        sa.Column("priority", sa.Integer(), server_default="0", nullable=False),
        sa.Column("enterprise", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("unlimited", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("currency ~ '^[a-z]{3}$'", name=op.f("ck_plans_currency_iso")),
        sa.CheckConstraint("interval IN ('month','year')", name=op.f("ck_plans_interval_known")),
        sa.CheckConstraint(
            "NOT trial OR trial_days > 0", name=op.f("ck_plans_trial_days_positive")
        ),
        sa.CheckConstraint("price_cents >= 0", name=op.f("ck_plans_price_nonnegative")),
        sa.PrimaryKeyConstraint("plan_id", name=op.f("pk_plans")),
    )
    op.create_index(
        "uq_plans_active_name", "plans", ["name"], unique=True, postgresql_where=sa.text("active")
    )
    op.create_table(
        "reservations",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("reservation_id", sa.String(length=40), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("resource", sa.String(length=72), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("windows", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("held_micros", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("status", sa.String(length=16), server_default="active", nullable=False),
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("usage_record_id", sa.String(length=40), nullable=True),
        sa.Column("commit_response", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.CheckConstraint(
            "status IN ('active','committed','released','expired')",
            name=op.f("ck_reservations_status_known"),
        ),
        sa.CheckConstraint("amount > 0", name=op.f("ck_reservations_amount_positive")),
        sa.PrimaryKeyConstraint("tenant_id", "reservation_id", name=op.f("pk_reservations")),
    )
    op.create_index(
        "ix_reservations_expiry",
        "reservations",
        ["expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_index(
        "ix_reservations_live",
        "reservations",
        ["tenant_id", "resource", "expires_at"],
        unique=False,
        postgresql_where=sa.text("status = 'active'"),
    )
    op.create_table(
        "stripe_webhook_events",
        sa.Column("event_id", sa.String(length=255), nullable=False),
        sa.Column("type", sa.String(length=128), nullable=False),
        sa.Column("payload", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="received", nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("stripe_created_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('received','processed','failed','ignored')",
            name=op.f("ck_stripe_webhook_events_status_known"),
        ),
        sa.PrimaryKeyConstraint("event_id", name=op.f("pk_stripe_webhook_events")),
    )
    op.create_index(
        "ix_stripe_webhook_events_status", "stripe_webhook_events", ["status"], unique=False
    )
    op.create_table(
        "tenants",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("email", sa.String(length=320), server_default="", nullable=False),
        sa.Column("timezone", sa.String(length=64), server_default="UTC", nullable=False),
        sa.Column("trial_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_tenants")),
    )
    op.create_table(
        "usage_counters",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("resource", sa.String(length=72), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("reserved", sa.BigInteger(), server_default="0", nullable=False),
        sa.CheckConstraint("reserved >= 0", name=op.f("ck_usage_counters_reserved_nonnegative")),
        sa.CheckConstraint("used >= 0", name=op.f("ck_usage_counters_used_nonnegative")),
        sa.PrimaryKeyConstraint(
            "tenant_id", "resource", "period", "window_start", name=op.f("pk_usage_counters")
        ),
    )
    op.create_table(
        "usage_records",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("usage_record_id", sa.String(length=40), nullable=False),
        sa.Column("resource", sa.String(length=72), nullable=False),
        sa.Column("amount", sa.BigInteger(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column("reservation_id", sa.String(length=40), nullable=True),
        sa.Column("plan_id", sa.String(length=64), nullable=True),
        sa.Column("provider", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=128), nullable=True),
        sa.Column("input_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("wallet_charged_micros", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("over_limit", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column(
            "labels",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('consume','commit','free')", name=op.f("ck_usage_records_kind_known")
        ),
        sa.CheckConstraint("cost_micros >= 0", name=op.f("ck_usage_records_cost_nonnegative")),
        sa.PrimaryKeyConstraint("tenant_id", "usage_record_id", name=op.f("pk_usage_records")),
    )
    op.create_index(
        "ix_usage_records_tenant_time", "usage_records", ["tenant_id", "occurred_at"], unique=False
    )
    op.create_table(
        "plan_quotas",
        sa.Column("plan_id", sa.String(length=64), nullable=False),
        sa.Column("resource", sa.String(length=72), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("limit", sa.BigInteger(), nullable=False),
        sa.Column(
            "warn_at",
            postgresql.ARRAY(sa.Integer()),
            server_default=sa.text("'{80,95}'::integer[]"),
            nullable=False,
        ),
        sa.Column("overage", sa.String(length=8), server_default="block", nullable=False),
        sa.CheckConstraint(
            "overage IN ('block','wallet')", name=op.f("ck_plan_quotas_overage_known")
        ),
        sa.CheckConstraint(
            "period IN ('daily','weekly','monthly','overall','cumulative')",
            name=op.f("ck_plan_quotas_period_known"),
        ),
        sa.CheckConstraint(
            "resource IN ('tokens','messages','agents','bots','boards','companions','files','storage','research_runs','tool_calls','media_processing') OR resource ~ '^custom:[a-z0-9][a-z0-9_.-]{0,62}$'",
            name=op.f("ck_plan_quotas_resource_known"),
        ),
        sa.CheckConstraint('"limit" >= 0', name=op.f("ck_plan_quotas_limit_nonnegative")),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["plans.plan_id"],
            name=op.f("fk_plan_quotas_plan_id_plans"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("plan_id", "resource", "period", name=op.f("pk_plan_quotas")),
    )
    op.create_table(
        "plan_wallet_grants",
        sa.Column("plan_id", sa.String(length=64), nullable=False),
        sa.Column("grant_on", sa.String(length=16), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("expires_after_days", sa.Integer(), nullable=True),
        sa.CheckConstraint(
            "grant_on IN ('start','renewal','upgrade')",
            name=op.f("ck_plan_wallet_grants_grant_on_known"),
        ),
        sa.CheckConstraint("amount_micros > 0", name=op.f("ck_plan_wallet_grants_amount_positive")),
        sa.CheckConstraint(
            "expires_after_days IS NULL OR expires_after_days > 0",
            name=op.f("ck_plan_wallet_grants_expiry_positive"),
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"],
            ["plans.plan_id"],
            name=op.f("fk_plan_wallet_grants_plan_id_plans"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("plan_id", "grant_on", name=op.f("pk_plan_wallet_grants")),
    )
    op.create_table(
        "quota_overrides",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("resource", sa.String(length=72), nullable=False),
        sa.Column("period", sa.String(length=16), nullable=False),
        sa.Column("limit", sa.BigInteger(), nullable=False),
        sa.Column(
            "warn_at",
            postgresql.ARRAY(sa.Integer()),
            server_default=sa.text("'{80,95}'::integer[]"),
            nullable=False,
        ),
        sa.Column("overage", sa.String(length=8), server_default="block", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "overage IN ('block','wallet')", name=op.f("ck_quota_overrides_overage_known")
        ),
        sa.CheckConstraint(
            "period IN ('daily','weekly','monthly','overall','cumulative')",
            name=op.f("ck_quota_overrides_period_known"),
        ),
        sa.CheckConstraint(
            "resource IN ('tokens','messages','agents','bots','boards','companions','files','storage','research_runs','tool_calls','media_processing') OR resource ~ '^custom:[a-z0-9][a-z0-9_.-]{0,62}$'",
            name=op.f("ck_quota_overrides_resource_known"),
        ),
        sa.CheckConstraint('"limit" >= 0', name=op.f("ck_quota_overrides_limit_nonnegative")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_quota_overrides_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "resource", "period", name=op.f("pk_quota_overrides")),
    )
    op.create_table(
        "subscriptions",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("subscription_id", sa.String(length=64), nullable=False),
        sa.Column("plan_id", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=24), nullable=False),
        sa.Column("is_current", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("stripe_customer_id", sa.String(length=255), nullable=True),
        sa.Column("stripe_subscription_id", sa.String(length=255), nullable=True),
        sa.Column("current_period_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("current_period_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column("billing_cycle_anchor", sa.DateTime(timezone=True), nullable=False),
        sa.Column("trial_start", sa.DateTime(timezone=True), nullable=True),
        sa.Column("trial_end", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "cancel_at_period_end", sa.Boolean(), server_default=sa.text("false"), nullable=False
        ),
        sa.Column("past_due_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("canceled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stripe_state_at", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('trialing','active','past_due','unpaid','incomplete','incomplete_expired','trial_expired','canceled')",
            name=op.f("ck_subscriptions_status_known"),
        ),
        sa.ForeignKeyConstraint(
            ["plan_id"], ["plans.plan_id"], name=op.f("fk_subscriptions_plan_id_plans")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_subscriptions_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "subscription_id", name=op.f("pk_subscriptions")),
        sa.UniqueConstraint(
            "stripe_subscription_id", name=op.f("uq_subscriptions_stripe_subscription_id")
        ),
    )
    op.create_index(
        "uq_subscriptions_one_current",
        "subscriptions",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("is_current"),
    )
    op.create_table(
        "wallet_grants",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("grant_key", sa.String(length=255), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("remaining_micros", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("expired", sa.Boolean(), server_default=sa.text("false"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "source IN ('start','renewal','upgrade','manual')",
            name=op.f("ck_wallet_grants_source_known"),
        ),
        sa.CheckConstraint("amount_micros > 0", name=op.f("ck_wallet_grants_amount_positive")),
        sa.CheckConstraint(
            "remaining_micros >= 0 AND remaining_micros <= amount_micros",
            name=op.f("ck_wallet_grants_remaining_range"),
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_wallet_grants_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", "grant_id", name=op.f("pk_wallet_grants")),
        sa.UniqueConstraint(
            "tenant_id", "grant_key", name=op.f("uq_wallet_grants_tenant_id_grant_key")
        ),
    )
    op.create_table(
        "wallets",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("balance_micros", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("held_micros", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("balance_micros >= 0", name=op.f("ck_wallets_balance_nonnegative")),
        sa.CheckConstraint("held_micros >= 0", name=op.f("ck_wallets_held_nonnegative")),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.tenant_id"], name=op.f("fk_wallets_tenant_id_tenants")
        ),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_wallets")),
    )
    op.create_table(
        "wallet_ledger",
        sa.Column("tenant_id", sa.String(length=128), nullable=False),
        sa.Column("entry_id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("grant_id", sa.String(length=40), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("delta_micros", sa.BigInteger(), nullable=False),
        sa.Column("usage_record_id", sa.String(length=40), nullable=True),
        sa.Column("reason", sa.Text(), server_default="", nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint(
            "kind IN ('grant','debit','expire','refund')", name=op.f("ck_wallet_ledger_kind_known")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id", "grant_id"],
            ["wallet_grants.tenant_id", "wallet_grants.grant_id"],
            name=op.f("fk_wallet_ledger_tenant_id_grant_id_wallet_grants"),
        ),
        sa.PrimaryKeyConstraint("tenant_id", "entry_id", name=op.f("pk_wallet_ledger")),
    )
    # Immutable tables: UPDATE, DELETE and TRUNCATE are rejected by the database itself.
    op.execute(
        """
        CREATE FUNCTION reject_append_only_change() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION '% is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
                USING ERRCODE = 'P0001';
        END;
        $$
        """
    )
    for table in APPEND_ONLY_TABLES:
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION reject_append_only_change()"
        )
        op.execute(
            f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
            "FOR EACH STATEMENT EXECUTE FUNCTION reject_append_only_change()"
        )


def downgrade() -> None:
    for table in APPEND_ONLY_TABLES:
        op.execute(f"DROP TRIGGER {table}_no_truncate ON {table}")
        op.execute(f"DROP TRIGGER {table}_append_only ON {table}")
    op.execute("DROP FUNCTION reject_append_only_change()")
    op.drop_table("wallet_ledger")
    op.drop_table("wallets")
    op.drop_table("wallet_grants")
    op.drop_index(
        "uq_subscriptions_one_current",
        table_name="subscriptions",
        postgresql_where=sa.text("is_current"),
    )
    op.drop_table("subscriptions")
    op.drop_table("quota_overrides")
    op.drop_table("plan_wallet_grants")
    op.drop_table("plan_quotas")
    op.drop_index("ix_usage_records_tenant_time", table_name="usage_records")
    op.drop_table("usage_records")
    op.drop_table("usage_counters")
    op.drop_table("tenants")
    op.drop_index("ix_stripe_webhook_events_status", table_name="stripe_webhook_events")
    op.drop_table("stripe_webhook_events")
    op.drop_index(
        "ix_reservations_live",
        table_name="reservations",
        postgresql_where=sa.text("status = 'active'"),
    )
    op.drop_index(
        "ix_reservations_expiry",
        table_name="reservations",
        postgresql_where=sa.text("status = 'active'"),
    )
    op.drop_table("reservations")
    op.drop_index("uq_plans_active_name", table_name="plans", postgresql_where=sa.text("active"))
    op.drop_table("plans")
    op.drop_index("ix_notifications_tenant_created", table_name="notifications")
    op.drop_table("notifications")
    op.drop_table("model_prices")
    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("http_idempotency_keys")
    op.drop_index("ix_audit_log_entity", table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("api_keys")
