"""Helpers of the batching tests: what a caller sees of an answer, a tenant's books, and
ways to make batches fail as a whole."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from psycopg_pool import AsyncConnectionPool

from billing_core.errors import QuotaError
from billing_core.quota import engine as engine_module
from billing_core.quota.answers import GroupDecision, Result, Tidied
from billing_core.quota.engine import QuotaEngine
from billing_core.quota.requests import Request
from tests import factories as f

Pool = AsyncConnectionPool[Any]


def outcome(result: Result) -> Any:
    """What a caller sees, without the ids that differ between two tenants."""
    if isinstance(result, QuotaError):  # without the side's tenant and reservation ids
        message = re.sub(
            r"rsv_\w+", "rsv_", re.sub(r"'(one|many|alone)(\d)-", r"'\2-", result.message)
        )
        return (type(result).__name__, message)
    if isinstance(result, bool):  # a Release
        return result
    if isinstance(result, GroupDecision):
        return ("group", result.allowed, [outcome(m) for m in result.members])
    assert not isinstance(result, Tidied)
    data = {**result.to_json(), "replayed": result.replayed}
    data.pop("usage_record_id", None)
    data.pop("reservation_id", None)
    return repr(sorted(data.items()))


def break_batches(
    monkeypatch: pytest.MonkeyPatch, *, failing: Callable[[Request], bool] = lambda _: False
) -> None:
    """Every transaction of more than one request fails as a whole (as a bug would), and a
    lone request for which `failing` is true fails too; other lone requests are decided."""
    real = engine_module.decide_batch  # type: ignore[attr-defined]

    async def decide(session: Any, reqs: Any, now: Any, **kwargs: Any) -> Any:
        if len(reqs) > 1:
            raise RuntimeError("a bug that fails a batch as a whole")
        if failing(reqs[0]):
            raise ValueError("a bug for this request")
        return await real(session, reqs, now, **kwargs)

    monkeypatch.setattr(engine_module, "decide_batch", decide)


def without_fallback(engine: QuotaEngine) -> None:
    """A batch that fails as a whole and falls back to one request per transaction fails
    the test instead."""

    async def fail(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the batch failed and fell back to one request per transaction")

    engine._decide_one_at_a_time = fail  # type: ignore[method-assign]


async def books(pool: Pool, tenant: str) -> Any:
    # an empty counter counts as none: a transaction that locks one and leaves it empty
    # drops it, so two ways of deciding the same requests may leave different empty rows
    counters = await f.fetch(
        pool,
        "SELECT resource, period, window_start, used, reserved FROM usage_counters"
        " WHERE tenant_id = %s AND (used <> 0 OR reserved <> 0) ORDER BY 1, 2, 3",
        tenant,
    )
    records = await f.fetch(
        pool,
        "SELECT resource, amount, kind, cost_micros, wallet_charged_micros, over_limit,"
        " request_id, reservation_id IS NULL, plan_id, provider, model, input_tokens, labels"
        " FROM usage_records WHERE tenant_id = %s ORDER BY request_id, kind, amount",
        tenant,
    )
    wallet = await f.fetch(
        pool, "SELECT balance_micros, held_micros FROM wallets WHERE tenant_id = %s", tenant
    )
    grants = await f.fetch(
        pool,
        "SELECT amount_micros, remaining_micros, expired FROM wallet_grants"
        " WHERE tenant_id = %s ORDER BY created_at, grant_key",
        tenant,
    )
    ledger = await f.fetch(
        pool,
        "SELECT l.kind, l.delta_micros, l.reason, r.request_id FROM wallet_ledger l"
        " LEFT JOIN usage_records r ON r.tenant_id = l.tenant_id"
        " AND r.usage_record_id = l.usage_record_id WHERE l.tenant_id = %s ORDER BY l.entry_id",
        tenant,
    )
    notes = await f.fetch(
        pool,
        "SELECT kind, message, details FROM notifications WHERE tenant_id = %s ORDER BY 2",
        tenant,
    )
    keys = await f.fetch(
        pool,
        "SELECT request_id, operation, request_hash, response - 'usage_record_id'"
        " - 'reservation_id' FROM idempotency_keys WHERE tenant_id = %s ORDER BY 1",
        tenant,
    )
    reservations = await f.fetch(
        pool,
        "SELECT request_id, resource, amount, windows, held_micros, status, labels, expires_at,"
        " created_at, finished_at, commit_response - 'usage_record_id',"
        " usage_record_id IS NULL FROM reservations WHERE tenant_id = %s"
        " ORDER BY request_id, status, created_at",
        tenant,
    )
    return counters, records, wallet, grants, ledger, notes, keys, reservations
