"""A batch of requests in one transaction decides and books exactly like the same requests
one per transaction, through the same core — also when batches fail and fall back."""

from __future__ import annotations

import secrets
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from billing_core.billing.model import quota
from billing_core.clock import FrozenClock
from billing_core.db.quota_sql import text_array
from billing_core.quota.answers import Decision, Result
from billing_core.quota.engine import QuotaRules
from billing_core.quota.requests import (
    CommitRequest,
    ConsumeRequest,
    ReleaseRequest,
    Request,
    ReserveRequest,
)
from billing_core.rules.limits import SubscriptionStatus
from billing_core.rules.pricing import TokenUsage
from tests import factories as f
from tests.integration.batching import Pool, books, break_batches, outcome, without_fallback
from tests.integration.test_properties import START

MODEL = "coalesce-model"


requests = st.lists(
    st.tuples(
        # tenant: credits (most often) / no credits / trial expired / expired reservation
        st.sampled_from([0, 0, 0, 1, 2, 3]),
        st.sampled_from(["tokens", "messages", "gold"]),  # "gold" is not a resource
        st.integers(0, 40),  # 0 is invalid
        st.integers(0, 12),  # request id: small range → retries of earlier ids
        st.booleans(),  # dry run
        st.integers(0, 9),  # 0: a model without a price
        # a Reserve, Commit or Release rather than a CheckAndConsume; a Commit's or Release's
        # request id picks a reservation of an earlier batch (its dry-run flag: asked by
        # another tenant)
        st.sampled_from(
            ["consume", "consume", "reserve", "reserve", "commit", "commit", "release"]
        ),
    ),
    min_size=1,
    max_size=60,
)
Item = tuple[int, str, int, int, bool, int, str]
# Reserves and Commits among CheckAndConsumes, in two batches: a hold within the daily
# window, a charge, a hold the wallet pays for, its replay and its reuse, a reservation of
# another resource, a denial without credits, a dry run, a charge after the holds, a tenant
# left to the one-by-one path; then Commits of them: less and more than held, twice, by
# another tenant, of a denied Reserve, and of the reservation that expired before, with a
# new Reserve in the same batch
RESERVES: list[Item] = [
    (0, "tokens", 20, 1, False, 1, "reserve"),
    (0, "tokens", 20, 2, False, 1, "consume"),
    (0, "tokens", 15, 3, False, 1, "reserve"),
    (0, "tokens", 15, 3, False, 1, "reserve"),
    (0, "tokens", 16, 3, False, 1, "reserve"),
    (0, "messages", 5, 4, False, 1, "reserve"),
    (1, "tokens", 40, 5, False, 1, "reserve"),
    (0, "tokens", 40, 6, True, 1, "reserve"),
    (0, "tokens", 10, 7, False, 1, "consume"),
    (3, "messages", 3, 8, False, 1, "reserve"),
    (0, "tokens", 12, 1, False, 1, "commit"),
    (0, "tokens", 30, 2, False, 1, "commit"),
    (0, "tokens", 30, 2, False, 1, "commit"),
    (0, "tokens", 31, 2, False, 1, "commit"),
    (0, "messages", 5, 3, False, 1, "commit"),
    (2, "messages", 5, 6, True, 1, "commit"),
    (1, "tokens", 5, 5, False, 1, "commit"),
    (3, "messages", 2, 0, False, 1, "commit"),
    (0, "tokens", 9, 9, False, 0, "commit"),
    (0, "messages", 2, 10, False, 1, "reserve"),
]

# A Commit whose charge the wallet can pay only with the hold it gives back
HOLD_BACK: list[Item] = [
    (0, "tokens", 30, 1, False, 1, "consume"),
    (0, "tokens", 100, 2, False, 1, "reserve"),
    (0, "tokens", 10, 3, False, 1, "consume"),
    (0, "tokens", 100, 1, False, 1, "commit"),
]


# Releases: of a reservation with a hold, twice, then its Commit; of a committed one; by
# another tenant; of the reservation that expired before; with a new Reserve alongside
RELEASES: list[Item] = [
    (0, "tokens", 40, 1, False, 1, "reserve"),
    (0, "messages", 5, 2, False, 1, "reserve"),
    (0, "tokens", 5, 3, False, 1, "reserve"),
    (0, "tokens", 0, 1, False, 1, "release"),
    (0, "tokens", 0, 1, False, 1, "release"),
    (0, "tokens", 7, 1, False, 1, "commit"),
    (0, "messages", 3, 2, False, 1, "commit"),
    (0, "messages", 0, 2, False, 1, "release"),
    (2, "tokens", 0, 3, True, 1, "release"),
    (0, "tokens", 0, 0, False, 1, "release"),
    (0, "tokens", 9, 4, False, 1, "reserve"),
]


def _batch_of(size: int, cuts: list[int]) -> list[int]:
    """The batch each position of a workload falls in, cut as the test cuts it."""
    sizes: list[int] = []
    for cut in cuts * 10:
        if sum(sizes) >= size:
            break
        sizes.append(min(cut, size - sum(sizes)))
    sizes.append(size - sum(sizes))
    return [b for b, n in enumerate(sizes) for _ in range(n)]


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(workload=requests, cuts=st.lists(st.integers(1, 20), min_size=1, max_size=10))
@example(workload=RESERVES, cuts=[10])
@example(workload=HOLD_BACK, cuts=[3])
@example(workload=RELEASES, cuts=[3])
async def test_batches_decide_exactly_like_one_by_one(
    pool: Pool, workload: list[Item], cuts: list[int]
) -> None:
    clock = FrozenClock(START)
    engine = f.engine(pool, clock, QuotaRules())
    tag = secrets.token_hex(4)  # not `random`: hypothesis seeds it per example
    await f.price(pool, "p", MODEL, 1_000_000, 0, START)
    plan = await f.plan(
        pool,
        START,
        f"co-{tag}",
        [
            quota("tokens", "daily", 30, overage="wallet", warn_at=(50,)),
            quota("tokens", "monthly", 150),
            quota("messages", "daily", 70),
        ],
    )
    upgrade = await f.plan(pool, START, f"up-{tag}", [quota("messages", "daily", 500)])
    earlier = f.engine(pool, FrozenClock(START - timedelta(hours=1)), QuotaRules())
    names: dict[str, list[str]] = {}
    expired_ids: dict[str, str] = {}
    for side in ("one", "many", "alone"):
        names[side] = [f"{side}{k}-{tag}" for k in range(4)]
        credits, broke, expired, reserved = names[side]
        await f.tenant(pool, START, credits, plan, credits_micros=400)
        await f.tenant(pool, START, broke, plan)
        await f.tenant(
            pool,
            START,
            expired,
            plan,
            status=SubscriptionStatus.TRIALING,
            trial_end=START - timedelta(days=1),
        )
        await f.tenant(pool, START, reserved, plan, credits_micros=100)
        # a reservation that expired before the workload: its tenant takes the one-by-one path
        held = await earlier.reserve(
            ReserveRequest(reserved, "messages", 5, "held", ttl_seconds=60)
        )
        expired_ids[side] = held.reservation_id

    batch_of = _batch_of(len(workload), cuts)
    answers: dict[str, list[Result]] = {"one": [], "many": [], "alone": []}

    def make(side: str, p: int) -> Request:
        who, resource, amount, rid, dry, model, kind = workload[p]
        tokens = None
        if resource == "tokens":
            tokens = TokenUsage("p", MODEL if model else "unpriced", amount * 2, 0)
        if kind in ("commit", "release"):  # of a reservation of an earlier batch, or the
            # expired one
            earlier_ones = [
                q for q in range(p) if workload[q][6] == "reserve" and batch_of[q] < batch_of[p]
            ]
            q = [-1, *earlier_ones][rid % (len(earlier_ones) + 1)]
            owner = 3 if q < 0 else workload[q][0]
            made = answers[side][q] if q >= 0 else None
            reservation_id = (
                expired_ids[side]
                if q < 0
                else made.reservation_id
                if isinstance(made, Decision) and made.reservation_id
                else f"rsv_none{q}"
            )
            tenant = names[side][who if dry else owner]
            if kind == "release":
                return ReleaseRequest(tenant, reservation_id)
            return CommitRequest(tenant, reservation_id, amount, tokens)
        if kind == "reserve":
            return ReserveRequest(
                names[side][who], resource, amount, f"r{rid}", dry, tokens, ttl_seconds=60
            )
        return ConsumeRequest(
            names[side][who], resource, amount, f"r{rid}", dry_run=dry, tokens=tokens
        )

    for p in range(len(workload)):  # one request per transaction
        answers["one"].append(await engine.decide(make("one", p)))

    # the same batches failing as a whole: decided again one request per transaction, each
    # tenant in order and tenants side by side (the fallback) — the order between tenants
    # changes nothing
    with pytest.MonkeyPatch.context() as broken:
        break_batches(broken)
        for b in range(batch_of[-1] + 1):
            batch = [make("alone", p) for p in range(len(workload)) if batch_of[p] == b]
            answers["alone"] += await engine.run_batch(batch)
    without_fallback(engine)
    for b in range(batch_of[-1] + 1):
        batch = [make("many", p) for p in range(len(workload)) if batch_of[p] == b]
        answers["many"] += await engine.run_batch(batch)
    sequential = [outcome(r) for r in answers["one"]]
    assert [outcome(r) for r in answers["many"]] == sequential
    assert [outcome(r) for r in answers["alone"]] == sequential
    for one, many, alone in zip(names["one"], names["many"], names["alone"], strict=True):
        assert await books(pool, many) == await books(pool, one) == await books(pool, alone)
    assert upgrade  # offered to denied message requests when it would have allowed them


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    values=st.lists(
        st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12), max_size=6
    )
)
async def test_text_array_literals_round_trip(pool: Pool, values: list[str]) -> None:
    """The batch statements get their text[] parameters as literals: any string (quotes,
    backslashes, commas, braces, blanks, NULL-looking words) arrives as itself."""
    [(got,)] = await f.fetch(pool, "SELECT %s::text[]", text_array(values))
    assert got == values
