"""Every setting of every process, read from the environment into one typed object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Self

from billing_core.errors import InvalidRequest


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise InvalidRequest(f"setting {name} must be an integer, got {raw!r}") from None


def _str(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, "").strip() or default


@dataclass(frozen=True, slots=True)
class Settings:
    """Documented one by one in the README's settings table."""

    database_url: str = ""
    # quota sidecar
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    metrics_port: int = 9464
    grpc_auth_token: str = ""
    grpc_tls_cert_file: str = ""
    grpc_tls_key_file: str = ""
    db_pool_size: int = 8
    db_acquire_timeout_ms: int = 2000
    # off behind a pooler in transaction mode (PgBouncer): no prepared statements, no
    # session settings (both processes)
    db_prepared_statements: bool = True
    # off when the tables are partitioned or distributed by tenant: the sidecar's statements
    # are planned with their values, which prunes to the tenant's partition or shard
    db_generic_plans: bool = True
    drain_seconds: int = 10
    coalesce_requests: bool = True
    # batches decided at once; a tenant always goes to the same lane
    coalesce_lanes: int = 1
    # under load, the longest a request waits for company before its batch starts
    coalesce_gather_us: int = 2000
    # how long a batch may run before its lane goes on beside it without its tenants
    coalesce_stall_ms: int = 100
    # how long a batch waits for a row lock held elsewhere before its requests are decided
    # one by one, each tenant on its own (0: as long as it takes)
    batch_lock_timeout_ms: int = 1000
    # the domain of Envoy's rate-limit requests the sidecar counts (others: OK, counted nowhere)
    rls_domain: str = "quota"
    # quota rules
    idempotency_ttl_hours: int = 24
    past_due_grace_days: int = 3
    reservation_sweep_seconds: int = 30
    # control plane
    http_host: str = "127.0.0.1"
    http_port: int = 8000
    admin_api_key: str = ""
    # where browsers reach the control plane (checkout success/cancel and portal return URLs)
    public_base_url: str = "http://127.0.0.1:8000"
    trial_expiry_seconds: int = 60
    # a webhook event stored this long ago and never applied (its process died) is applied
    # by the control plane's housekeeping, which runs every trial_expiry_seconds
    webhook_reclaim_seconds: int = 300
    # billing and admin pages: the key that signs billing links, sessions and forms; how long
    # a session lasts; who may embed the billing pages (CSP frame-ancestors)
    billing_link_secret: str = ""
    billing_session_hours: int = 12
    admin_session_hours: int = 8
    billing_frame_ancestors: str = "'self'"
    # failed authentications an address may make in a minute before it is answered 429
    auth_failures_per_minute: int = 10
    # Stripe: real Stripe when stripe_secret_key is set, else the local emulator
    stripe_secret_key: str = ""
    stripe_webhook_secret: str = ""
    stripe_emulator_host: str = "127.0.0.1"
    stripe_emulator_port: int = 12111
    stripe_emulator_key: str = "sk_test_emulator"
    stripe_webhook_url: str = "http://127.0.0.1:8000/webhooks/stripe"
    stripe_emulator_state: str = ""
    # logging
    log_level: str = "info"
    log_format: str = "auto"
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        env = os.environ if env is None else env
        settings = cls(
            database_url=_str(env, "DATABASE_URL"),
            grpc_host=_str(env, "QUOTA_GRPC_HOST", "127.0.0.1"),
            grpc_port=_int(env, "QUOTA_GRPC_PORT", 50051),
            metrics_port=_int(env, "QUOTA_METRICS_PORT", 9464),
            grpc_auth_token=_str(env, "QUOTA_AUTH_TOKEN"),
            grpc_tls_cert_file=_str(env, "QUOTA_TLS_CERT_FILE"),
            grpc_tls_key_file=_str(env, "QUOTA_TLS_KEY_FILE"),
            db_pool_size=_int(env, "QUOTA_DB_POOL_SIZE", 8),
            db_acquire_timeout_ms=_int(env, "QUOTA_DB_ACQUIRE_TIMEOUT_MS", 2000),
            db_prepared_statements=_str(env, "DB_PREPARED_STATEMENTS", "on").lower()
            not in ("0", "off", "false"),
            db_generic_plans=_str(env, "DB_GENERIC_PLANS", "on").lower()
            not in ("0", "off", "false"),
            drain_seconds=_int(env, "QUOTA_DRAIN_SECONDS", 10),
            coalesce_requests=_str(env, "QUOTA_COALESCE", "on").lower()
            not in ("0", "off", "false"),
            coalesce_lanes=_int(env, "QUOTA_COALESCE_LANES", 1),
            coalesce_gather_us=_int(env, "QUOTA_COALESCE_GATHER_US", 2000),
            coalesce_stall_ms=_int(env, "QUOTA_COALESCE_STALL_MS", 100),
            batch_lock_timeout_ms=_int(env, "QUOTA_BATCH_LOCK_TIMEOUT_MS", 1000),
            rls_domain=_str(env, "QUOTA_RLS_DOMAIN", "quota"),
            idempotency_ttl_hours=_int(env, "IDEMPOTENCY_TTL_HOURS", 24),
            past_due_grace_days=_int(env, "PAST_DUE_GRACE_DAYS", 3),
            reservation_sweep_seconds=_int(env, "RESERVATION_SWEEP_SECONDS", 30),
            http_host=_str(env, "CONTROL_PLANE_HOST", "127.0.0.1"),
            http_port=_int(env, "CONTROL_PLANE_PORT", 8000),
            admin_api_key=_str(env, "ADMIN_API_KEY"),
            public_base_url=_str(env, "PUBLIC_BASE_URL", "http://127.0.0.1:8000").rstrip("/"),
            trial_expiry_seconds=_int(env, "TRIAL_EXPIRY_SECONDS", 60),
            webhook_reclaim_seconds=_int(env, "WEBHOOK_RECLAIM_SECONDS", 300),
            billing_link_secret=_str(env, "BILLING_LINK_SECRET"),
            billing_session_hours=_int(env, "BILLING_SESSION_HOURS", 12),
            admin_session_hours=_int(env, "ADMIN_SESSION_HOURS", 8),
            billing_frame_ancestors=_str(env, "BILLING_FRAME_ANCESTORS", "'self'"),
            auth_failures_per_minute=_int(env, "AUTH_FAILURES_PER_MINUTE", 10),
            stripe_secret_key=_str(env, "STRIPE_SECRET_KEY"),
            stripe_webhook_secret=_str(env, "STRIPE_WEBHOOK_SECRET"),
            stripe_emulator_host=_str(env, "STRIPE_EMULATOR_HOST", "127.0.0.1"),
            stripe_emulator_port=_int(env, "STRIPE_EMULATOR_PORT", 12111),
            stripe_emulator_key=_str(env, "STRIPE_EMULATOR_KEY", "sk_test_emulator"),
            stripe_emulator_state=_str(env, "STRIPE_EMULATOR_STATE"),
            stripe_webhook_url=_str(
                env, "STRIPE_WEBHOOK_URL", "http://127.0.0.1:8000/webhooks/stripe"
            ),
            log_level=_str(env, "LOG_LEVEL", "info").lower(),
            log_format=_str(env, "LOG_FORMAT", "auto").lower(),
        )
        settings.validate()
        return settings

    def validate(self) -> None:
        if bool(self.grpc_tls_cert_file) != bool(self.grpc_tls_key_file):
            raise InvalidRequest("QUOTA_TLS_CERT_FILE and QUOTA_TLS_KEY_FILE go together")
        if self.idempotency_ttl_hours < 24:
            raise InvalidRequest("IDEMPOTENCY_TTL_HOURS must be at least 24")
        if not 1 <= self.coalesce_lanes <= 64:
            raise InvalidRequest("QUOTA_COALESCE_LANES must be between 1 and 64")
        if self.db_pool_size < 1:
            raise InvalidRequest("QUOTA_DB_POOL_SIZE must be at least 1")
        if not 0 <= self.coalesce_gather_us <= 100_000:
            raise InvalidRequest("QUOTA_COALESCE_GATHER_US must be between 0 and 100000")
        if not 0 <= self.coalesce_stall_ms <= 60_000:
            raise InvalidRequest("QUOTA_COALESCE_STALL_MS must be between 0 and 60000")
        if not 0 <= self.batch_lock_timeout_ms <= 600_000:
            raise InvalidRequest("QUOTA_BATCH_LOCK_TIMEOUT_MS must be between 0 and 600000")
        if self.webhook_reclaim_seconds < 1:
            raise InvalidRequest("WEBHOOK_RECLAIM_SECONDS must be at least 1")
        if self.past_due_grace_days < 0:
            raise InvalidRequest("PAST_DUE_GRACE_DAYS must not be negative")
        if self.auth_failures_per_minute < 0:
            raise InvalidRequest("AUTH_FAILURES_PER_MINUTE must not be negative (0: no limit)")
        if self.billing_link_secret and len(self.billing_link_secret) < 32:
            raise InvalidRequest("BILLING_LINK_SECRET must be at least 32 characters")
        if not 1 <= self.billing_session_hours <= 24 * 30:
            raise InvalidRequest("BILLING_SESSION_HOURS must be between 1 and 720")
        if not 1 <= self.admin_session_hours <= 24 * 30:
            raise InvalidRequest("ADMIN_SESSION_HOURS must be between 1 and 720")
        if any(c in self.billing_frame_ancestors for c in ";,\n\r"):
            raise InvalidRequest("BILLING_FRAME_ANCESTORS is a space-separated list of sources")
        if self.log_format not in {"auto", "json", "console"}:
            raise InvalidRequest("LOG_FORMAT must be auto, json or console")

    @property
    def stripe_api_base(self) -> str | None:
        """None: real Stripe (the SDK's own address); else the local emulator."""
        if self.stripe_secret_key:
            return None
        return f"http://{self.stripe_emulator_host}:{self.stripe_emulator_port}"

    @property
    def stripe_api_key(self) -> str:
        return self.stripe_secret_key or self.stripe_emulator_key

    def require_database(self) -> str:
        if not self.database_url:
            raise InvalidRequest("DATABASE_URL is not set (make run sets it for you)")
        return self.database_url

    def with_changes(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]
