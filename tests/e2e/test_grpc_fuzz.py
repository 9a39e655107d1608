"""Every RPC of the sidecar, Envoy's ShouldRateLimit included, fuzzed over real gRPC
(hypothesis): odd, empty, huge and NUL strings, extreme amounts, unknown enum numbers,
missing fields, reused request ids, an oversized message. The answer is a decision or
INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION (RESOURCE_EXHAUSTED for size) — never
INTERNAL or UNKNOWN — and a refused call writes nothing. ShouldRateLimit answers OK or
OVER_LIMIT, and an OVER_LIMIT writes nothing."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg_pool import AsyncConnectionPool
from quota.v1 import quota_service_pb2_grpc
from quota_client import pb

from billing_core.billing.model import quota
from quota_service.server import QuotaServer
from tests import factories as f
from tests.reliability import harness

Pool = AsyncConnectionPool[Any]
INT64 = 2**63 - 1
REFUSALS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
}
COUNTED = (
    "usage_records",
    "reservations",
    "idempotency_keys",
    "wallet_ledger",
    "notifications",
)
FUZZ_TENANT = f"fuzz-{secrets.token_hex(3)}"

odd_text = st.one_of(
    st.just(""),
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("a\x00\u202e\U0001f600 /:%'\"\\"), max_size=20),
    st.just("x" * 5000),
)
tenants = st.one_of(st.just(FUZZ_TENANT), odd_text)
resources = st.one_of(
    st.sampled_from(["messages", "tokens", "agents", "storage", "custom:fuzz", "custom:"]),
    odd_text,
)
amounts = st.one_of(
    st.sampled_from([0, 1, -1, 7, INT64, -INT64 - 1, 2**53]),
    st.integers(min_value=-INT64 - 1, max_value=INT64),
)
request_ids = st.one_of(st.just(""), st.sampled_from(["fuzz-a", "fuzz-b"]), odd_text)
labels = st.dictionaries(odd_text, odd_text, max_size=4)
tokens = st.one_of(
    st.none(),
    st.builds(
        pb.TokenUsage,
        provider=odd_text,
        model=odd_text,
        input_tokens=amounts,
        output_tokens=amounts,
    ),
)


def _with_tokens(message: Any, given: pb.TokenUsage | None) -> Any:
    if given is not None:
        message.tokens.CopyFrom(given)
    return message


consume = st.builds(
    lambda t, r, a, i, d, k, lb: _with_tokens(
        pb.CheckAndConsumeRequest(
            tenant_id=t, resource=r, amount=a, request_id=i, dry_run=d, labels=lb
        ),
        k,
    ),
    tenants,
    resources,
    amounts,
    request_ids,
    st.booleans(),
    tokens,
    labels,
)
reserve = st.builds(
    lambda t, r, a, i, k, ttl: _with_tokens(
        pb.ReserveRequest(tenant_id=t, resource=r, amount=a, request_id=i, ttl_seconds=ttl), k
    ),
    tenants,
    resources,
    amounts,
    request_ids,
    tokens,
    st.integers(min_value=-(2**31), max_value=2**31 - 1),
)
commit = st.builds(
    lambda t, rid, a, k: _with_tokens(
        pb.CommitRequest(tenant_id=t, reservation_id=rid, amount=a), k
    ),
    tenants,
    st.one_of(odd_text, st.just("res_00000000000000000000000000")),
    amounts,
    tokens,
)
release = st.builds(pb.ReleaseRequest, tenant_id=tenants, reservation_id=odd_text)
free = st.builds(
    pb.FreeRequest, tenant_id=tenants, resource=resources, amount=amounts, request_id=request_ids
)
usage = st.one_of(
    st.builds(pb.GetUsageRequest, tenant_id=tenants),
    st.builds(pb.GetUsageRequest, tenant_id=tenants, resource=resources),
)


def _report(
    t: str, r: str, a: int, i: str, k: pb.TokenUsage | None, lb: dict[str, str], at: int | None
) -> pb.ReportUsageRequest:
    msg = pb.ReportUsageRequest(tenant_id=t, resource=r, amount=a, request_id=i, labels=lb)
    if at is not None:
        msg.occurred_at.seconds = at
    result: pb.ReportUsageRequest = _with_tokens(msg, k)
    return result


NOW_S = int(datetime.now(UTC).timestamp())
report = st.builds(
    _report,
    tenants,
    resources,
    amounts,
    request_ids,
    tokens,
    labels,
    st.one_of(
        st.none(),
        st.integers(min_value=NOW_S - 2 * 86_400, max_value=NOW_S + 600),
        st.sampled_from([0, -(2**62), 2**62, 253402300800, -62135596801]),
    ),
)
CALLS = {
    "CheckAndConsume": consume,
    "Reserve": reserve,
    "Commit": commit,
    "Release": release,
    "Free": free,
    "GetUsage": usage,
    "ReportUsage": report,
}


async def _counts(pool: Pool) -> tuple[int, ...]:
    sql = "SELECT " + ", ".join(f"(SELECT count(*) FROM {t})" for t in COUNTED)
    [row] = await f.fetch(pool, sql)
    return tuple(int(n) for n in row)


@pytest.fixture(scope="module")
async def fuzz_tenant(pool: Pool) -> str:
    now = datetime.now(UTC)
    plan = await f.plan(
        pool,
        now,
        FUZZ_TENANT,
        [
            quota("messages", "daily", 100),
            quota("tokens", "daily", 10_000, overage="wallet"),
            quota("agents", "cumulative", 5),
            quota("storage", "cumulative", 10**9),
        ],
    )
    await f.tenant(pool, now, FUZZ_TENANT, plan, credits_micros=1_000_000)
    return FUZZ_TENANT


@pytest.fixture(scope="module")
async def stub(sidecar: QuotaServer) -> AsyncIterator[quota_service_pb2_grpc.QuotaServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        yield quota_service_pb2_grpc.QuotaServiceStub(channel)


@pytest.fixture(scope="module")
def tally() -> Iterator[dict[str, int]]:
    """Bad inputs tried, for `make reliability`'s table."""
    counts = {"tried": 0, "refused": 0}
    yield counts
    harness.report(
        "gRPC fuzzing of every RPC (hypothesis)",
        bad_inputs=counts["tried"],
        lost=0,
        counted_twice=0,
        applied_twice=0,
        notes=f"{counts['refused']} refused with a clear status, none INTERNAL; "
        "a refusal wrote nothing",
    )


@settings(
    max_examples=400 * harness.scale(),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rpc=st.sampled_from(sorted(CALLS)), data=st.data())
async def test_every_rpc_answers_a_decision_or_a_clear_refusal(
    stub: quota_service_pb2_grpc.QuotaServiceStub,
    pool: Pool,
    fuzz_tenant: str,
    tally: dict[str, int],
    rpc: str,
    data: st.DataObject,
) -> None:
    request = data.draw(CALLS[rpc], label="request")
    before = await _counts(pool)
    tally["tried"] += 1
    try:
        await getattr(stub, rpc)(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        tally["refused"] += 1
        assert exc.code() in REFUSALS, (rpc, exc.code(), exc.details())
        assert exc.details(), "a refusal says why"
        assert await _counts(pool) == before, (rpc, "a refusal wrote")


def _descriptor(
    entries: list[tuple[str, str]], hits: int | None
) -> ratelimit_pb2.RateLimitDescriptor:
    made = ratelimit_pb2.RateLimitDescriptor(
        entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries]
    )
    if hits is not None:
        made.hits_addend.value = hits
    return made


entry_keys = st.one_of(st.sampled_from(["tenant", "resource", "member", "request_id"]), odd_text)
descriptors = st.builds(
    _descriptor,
    st.lists(st.tuples(entry_keys, st.one_of(tenants, resources, request_ids)), max_size=5),
    st.one_of(st.none(), st.sampled_from([0, 1, 2**53, 2**64 - 1]), st.integers(0, 2**64 - 1)),
)
should_rate_limit = st.builds(
    rls_pb2.RateLimitRequest,
    domain=st.one_of(st.just("quota"), odd_text),
    descriptors=st.lists(descriptors, max_size=4),
    hits_addend=st.one_of(st.just(0), st.integers(0, 2**32 - 1)),
)


@settings(
    max_examples=100 * harness.scale(),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=should_rate_limit)
async def test_envoy_rate_limit_answers_ok_or_over_limit_and_a_refusal_writes_nothing(
    sidecar: QuotaServer,
    pool: Pool,
    fuzz_tenant: str,
    tally: dict[str, int],
    request: rls_pb2.RateLimitRequest,
) -> None:
    """ShouldRateLimit never fails for what Envoy sends: a status per descriptor, and an
    OVER_LIMIT (an unknown tenant, an invalid entry, a denial) counts nothing."""
    before = await _counts(pool)
    tally["tried"] += 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        call = channel.unary_unary(
            "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            request_serializer=rls_pb2.RateLimitRequest.SerializeToString,
            response_deserializer=rls_pb2.RateLimitResponse.FromString,
        )
        answer = await call(request, timeout=10)
    assert len(answer.statuses) == len(request.descriptors)
    if answer.overall_code == rls_pb2.RateLimitResponse.OVER_LIMIT:
        tally["refused"] += 1
        assert {h.key for h in answer.response_headers_to_add} == {
            "x-quota-reason",
            "x-quota-message",
        }
        assert await _counts(pool) == before, "an OVER_LIMIT wrote"
    else:
        assert answer.overall_code == rls_pb2.RateLimitResponse.OK


async def test_unknown_fields_are_skipped_and_bytes_that_are_no_request_refused(
    sidecar: QuotaServer, fuzz_tenant: str
) -> None:
    """Bytes from a newer client: an unknown field is skipped, as proto3 wants. (No request
    carries an enum: an unknown enum number cannot reach the sidecar.)"""
    known = pb.GetUsageRequest(tenant_id=fuzz_tenant).SerializeToString()
    unknown_field = known + bytes([0xF8, 0x07, 0x2A])  # field 127, varint 42
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        raw = channel.unary_unary(
            "/quota.v1.QuotaService/GetUsage",
            request_serializer=lambda b: b,
            response_deserializer=pb.GetUsageResponse.FromString,
        )
        answer = await raw(unknown_field, timeout=10)
        assert answer.plan_id
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await raw(b"\xff\xff\xff", timeout=10)  # not a message at all
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a GetUsageRequest" in (refused.value.details() or "")


async def test_a_request_id_reused_with_other_parameters_is_refused(
    sidecar: QuotaServer, pool: Pool, fuzz_tenant: str
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
        stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
        rid = f"reuse-{secrets.token_hex(4)}"
        first = await stub.CheckAndConsume(
            pb.CheckAndConsumeRequest(
                tenant_id=fuzz_tenant, resource="messages", amount=1, request_id=rid
            )
        )
        assert first.allowed
        before = await _counts(pool)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CheckAndConsume(
                pb.CheckAndConsumeRequest(
                    tenant_id=fuzz_tenant, resource="messages", amount=2, request_id=rid
                )
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await _counts(pool) == before


async def test_an_oversized_message_is_resource_exhausted(
    sidecar: QuotaServer, pool: Pool, fuzz_tenant: str
) -> None:
    huge = pb.CheckAndConsumeRequest(
        tenant_id=fuzz_tenant,
        resource="messages",
        amount=1,
        request_id="huge",
        labels={"pad": "x" * (2 << 20)},
    )
    before = await _counts(pool)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{sidecar.port}", options=[("grpc.max_send_message_length", 8 << 20)]
    ) as channel:
        stub = quota_service_pb2_grpc.QuotaServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.CheckAndConsume(huge, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await _counts(pool) == before
