"""Several CheckAndConsumes of one tenant decided all-or-nothing (AdmitAllRequest, what
Envoy's descriptors of one HTTP request become): all count, or none does — alone, in a
coalesced batch, and in the fallback one request per transaction."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.errors import InvalidRequest, NotFound
from billing_core.quota.engine import QuotaEngine, QuotaRules
from billing_core.quota.requests import AdmitAllRequest, ConsumeRequest, Request
from billing_core.rules.limits import Reason
from billing_core.rules.pricing import TokenUsage
from tests import factories as f
from tests.integration.batching import Pool, books, break_batches, outcome
from tests.integration.test_properties import START


def group(tenant: str, *members: tuple[str, int, str]) -> AdmitAllRequest:
    return AdmitAllRequest(tenant, tuple(ConsumeRequest(tenant, r, n, i) for r, n, i in members))


async def test_every_member_counts_when_all_are_allowed(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(
        pool, clock.now(), uid, [quota("tool_calls", "daily", 10), quota("messages", "daily", 5)]
    )
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan)
    decided = await engine.admit_all(group(t, ("tool_calls", 3, "a:0"), ("messages", 2, "a:1")))
    assert decided.allowed and [m.windows[0].remaining for m in decided.members] == [7, 3]
    rows = await f.fetch(
        pool, "SELECT resource, amount FROM usage_records WHERE tenant_id = %s ORDER BY 1", t
    )
    assert rows == [("messages", 2), ("tool_calls", 3)]
    again = await engine.admit_all(group(t, ("tool_calls", 3, "a:0"), ("messages", 2, "a:1")))
    assert again.allowed and all(m.replayed for m in again.members)
    assert len(await f.fetch(pool, "SELECT 1 FROM usage_records WHERE tenant_id = %s", t)) == 2


async def test_one_denied_member_leaves_everything_as_it_was(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(
        pool,
        clock.now(),
        uid,
        [quota("tool_calls", "daily", 10, warn_at=(20,)), quota("messages", "daily", 5)],
    )
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan)
    await engine.consume(ConsumeRequest(t, "messages", 4, "before"))
    before = await books(pool, t)
    decided = await engine.admit_all(group(t, ("tool_calls", 3, "b:0"), ("messages", 2, "b:1")))
    assert not decided.allowed
    alone, denied = decided.members
    # the first would have been allowed alone: answered as a dry run (nothing counted)
    assert alone.allowed and not alone.usage_record_id and alone.windows[0].remaining == 7
    assert not denied.allowed and denied.reason is Reason.QUOTA_EXCEEDED
    assert denied.upgrade_plan_id == ""
    assert await books(pool, t) == before  # no record, counter, key or notification
    # denials are not kept: the same request ids are decided again, and count once room is made
    retried = await engine.admit_all(group(t, ("tool_calls", 3, "b:0"), ("messages", 1, "b:1")))
    assert retried.allowed and not any(m.replayed for m in retried.members)


async def test_members_see_each_other(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(pool, clock.now(), uid, [quota("tool_calls", "daily", 10)])
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan)
    both = group(t, ("tool_calls", 6, "c:0"), ("tool_calls", 6, "c:1"))
    decided = await engine.admit_all(both)
    assert not decided.allowed and [m.allowed for m in decided.members] == [True, False]
    assert await f.fetch(pool, "SELECT 1 FROM usage_records WHERE tenant_id = %s", t) == []
    assert (
        await engine.admit_all(group(t, ("tool_calls", 6, "d:0"), ("tool_calls", 4, "d:1")))
    ).allowed


async def test_a_wallet_payment_goes_back_with_the_group(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    now = clock.now()
    await f.price(pool, "acme", f"m-{uid}", 2_000_000, 8_000_000, now - timedelta(days=1))
    plan = await f.plan(
        pool,
        now,
        uid,
        [quota("tokens", "daily", 0, overage="wallet"), quota("messages", "daily", 1)],
    )
    t = await f.tenant(pool, now, f"t-{uid}", plan, credits_micros=10_000)
    tokens = TokenUsage("acme", f"m-{uid}", 600, 400)  # 4,400 micros, paid by the wallet
    before = await books(pool, t)
    pays = ConsumeRequest(t, "tokens", 1000, "w:0", tokens=tokens)
    denied = ConsumeRequest(t, "messages", 2, "w:1")
    decided = await engine.admit_all(AdmitAllRequest(t, (pays, denied)))
    assert not decided.allowed and decided.members[0].allowed
    assert await books(pool, t) == before  # balance, grants and ledger untouched
    paid = await engine.admit_all(
        AdmitAllRequest(t, (pays, ConsumeRequest(t, "messages", 1, "w:1")))
    )
    assert paid.allowed and paid.members[0].wallet_balance_micros == 10_000 - 4400


async def test_errors_and_invalid_groups(
    pool: Pool, engine: QuotaEngine, clock: FrozenClock, uid: str
) -> None:
    plan = await f.plan(pool, clock.now(), uid, [quota("tool_calls", "daily", 10)])
    t = await f.tenant(pool, clock.now(), f"t-{uid}", plan)
    with pytest.raises(NotFound, match="unknown tenant"):
        await engine.admit_all(group(f"nobody-{uid}", ("tool_calls", 1, "x")))
    with pytest.raises(InvalidRequest, match="one tenant"):
        await engine.admit_all(
            AdmitAllRequest(
                t,
                (
                    ConsumeRequest(t, "tool_calls", 1, "x"),
                    ConsumeRequest("o", "tool_calls", 1, "y"),
                ),
            )
        )
    with pytest.raises(InvalidRequest, match="distinct request_ids"):
        await engine.admit_all(group(t, ("tool_calls", 1, "x"), ("tool_calls", 1, "x")))
    with pytest.raises(InvalidRequest, match="between 1 and"):
        await engine.admit_all(AdmitAllRequest(t, ()))
    with pytest.raises(NotFound, match="no price"):  # a member's error: nothing counts
        await engine.admit_all(
            AdmitAllRequest(
                t,
                (
                    ConsumeRequest(t, "tool_calls", 1, "p:0"),
                    ConsumeRequest(t, "tool_calls", 1, "p:1", tokens=TokenUsage("a", "b", 1, 1)),
                ),
            )
        )
    assert await f.fetch(pool, "SELECT 1 FROM usage_records WHERE tenant_id = %s", t) == []


# a workload: per request, a group (True) of several members or a lone CheckAndConsume
workloads = st.lists(
    st.tuples(
        st.booleans(),
        st.lists(
            st.tuples(st.sampled_from(["tool_calls", "messages"]), st.integers(1, 6)),
            min_size=1,
            max_size=4,
        ),
        st.integers(0, 5),  # request id: a small range → retries of earlier ones
    ),
    min_size=1,
    max_size=25,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(workload=workloads, cut=st.integers(1, 10), fail=st.booleans())
async def test_groups_in_batches_decide_like_one_by_one(
    pool: Pool,
    monkeypatch: pytest.MonkeyPatch,
    workload: list[tuple[bool, list[tuple[str, int]], int]],
    cut: int,
    fail: bool,
) -> None:
    """The same workload, in batches of `cut` (which may fail as a whole and fall back) and
    one request per transaction, gives the same answers and the same books; and a tenant's
    counters always equal the sum of its records, within the limits."""
    clock = FrozenClock(START)
    tag = secrets.token_hex(4)
    plan = await f.plan(
        pool, START, f"g-{tag}", [quota("tool_calls", "daily", 20), quota("messages", "daily", 12)]
    )
    sides = [await f.tenant(pool, START, f"{side}-{tag}", plan) for side in ("one", "many")]

    def requests(t: str) -> list[Request]:
        made: list[Request] = []
        for is_group, members, rid in workload:
            asked = [
                ConsumeRequest(t, resource, n, f"r{rid}:{i}")
                for i, (resource, n) in enumerate(members)
            ]
            made.extend([AdmitAllRequest(t, tuple(asked))] if is_group else asked[:1])
        return made

    one_engine = f.engine(pool, clock, QuotaRules())
    alone = [outcome(await one_engine.decide(r)) for r in requests(sides[0])]
    batch_engine = f.engine(pool, clock, QuotaRules())
    if fail:
        with monkeypatch.context() as patched:
            break_batches(patched)
            batched = await _in_batches(batch_engine, requests(sides[1]), cut)
    else:
        batched = await _in_batches(batch_engine, requests(sides[1]), cut)
    assert batched == alone
    assert await books(pool, sides[1]) == await books(pool, sides[0])
    for t in sides:
        counted = await f.fetch(
            pool,
            "SELECT c.resource, c.used, (SELECT coalesce(sum(amount), 0) FROM usage_records r"
            " WHERE r.tenant_id = c.tenant_id AND r.resource = c.resource)"
            " FROM usage_counters c WHERE c.tenant_id = %s",
            t,
        )
        limits = {"tool_calls": 20, "messages": 12}
        assert all(used == int(total) <= limits[r] for r, used, total in counted), counted


async def _in_batches(engine: QuotaEngine, reqs: list[Request], cut: int) -> list[object]:
    answers: list[object] = []
    for start in range(0, len(reqs), cut):
        answers += [outcome(r) for r in await engine.run_batch(reqs[start : start + cut])]
    return answers
