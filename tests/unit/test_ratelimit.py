"""Envoy's RateLimitRequest read into one all-or-nothing group, and the answer built from
the group's decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2

from billing_core.quota.answers import Decision, GroupDecision, WindowView
from billing_core.rules.limits import Reason, WindowState
from billing_core.rules.resources import Period
from quota_service.ratelimit import Code, Parsed, Unit, parse, respond

NOW = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def descriptor(hits: int | None = None, **entries: str) -> ratelimit_pb2.RateLimitDescriptor:
    d = ratelimit_pb2.RateLimitDescriptor(
        entries=[
            ratelimit_pb2.RateLimitDescriptor.Entry(key=k, value=v) for k, v in entries.items()
        ]
    )
    if hits is not None:
        d.hits_addend.value = hits
    return d


def request(*descriptors: ratelimit_pb2.RateLimitDescriptor, domain: str = "quota", hits: int = 0):  # type: ignore[no-untyped-def]
    return rls_pb2.RateLimitRequest(domain=domain, descriptors=descriptors, hits_addend=hits)


def test_descriptors_become_one_group_with_their_request_ids_amounts_and_members() -> None:
    asked = request(
        descriptor(tenant="t1", resource="messages", request_id="abc", member="ada"),
        descriptor(path="/health"),  # no tenant and resource: not counted
        descriptor(hits=7, tenant="t1", resource="tool_calls", request_id="abc"),
        hits=3,
    )
    parsed = parse(asked, "quota", "fresh")
    assert parsed.counted == (0, 2) and parsed.refusal is None and parsed.group is not None
    first, second = parsed.group.members
    assert (first.resource, first.amount, first.request_id, dict(first.labels)) == (
        "messages", 3, "rls:abc:0", {"member": "ada"},
    )  # fmt: skip
    assert (second.amount, second.request_id, dict(second.labels)) == (7, "rls:abc:2", {})
    parsed.group.validate()


def test_without_a_request_id_each_call_counts_and_long_ids_are_hashed() -> None:
    parsed = parse(request(descriptor(tenant="t", resource="messages")), "quota", "http_1")
    assert parsed.group is not None and parsed.group.members[0].request_id == "rls:http_1:0"
    assert parsed.group.members[0].amount == 1
    long = parse(
        request(descriptor(tenant="t", resource="messages", request_id="r" * 500)), "quota", ""
    )
    assert long.group is not None
    assert len(long.group.members[0].request_id) <= 128
    long.group.validate()


def test_other_domains_and_descriptors_without_a_quota_are_counted_nowhere() -> None:
    other = request(descriptor(tenant="t", resource="messages"), domain="edge")
    assert parse(other, "quota", "f") == Parsed()
    answer = respond(other, Parsed(), None)
    assert answer.overall_code == Code.OK and [s.code for s in answer.statuses] == [Code.OK]
    assert parse(request(descriptor(tenant="t")), "quota", "f") == Parsed()


def test_several_tenants_or_absurd_amounts_are_refused_without_deciding() -> None:
    asked = request(
        descriptor(tenant="a", resource="messages"), descriptor(tenant="b", resource="messages")
    )
    parsed = parse(asked, "quota", "f")
    assert parsed.group is None and parsed.refusal is not None
    answer = respond(asked, parsed, None)
    assert answer.overall_code == Code.OVER_LIMIT
    assert [s.code for s in answer.statuses] == [Code.OVER_LIMIT] * 2
    headers = {h.key: h.value for h in answer.response_headers_to_add}
    assert (
        headers["x-quota-reason"] == "invalid_request"
        and "several tenants" in headers["x-quota-message"]
    )
    huge = parse(request(descriptor(hits=1 << 60, tenant="a", resource="m")), "quota", "f")
    assert huge.refusal is not None and huge.group is None and huge.counted == (0,)


def window(period: Period, limit: int, used: int, resets_in: timedelta | None) -> WindowView:
    return WindowView(
        period=period,
        limit=limit,
        used=used,
        remaining=max(0, limit - used),
        resets_at=None if resets_in is None else NOW + resets_in,
        state=WindowState.OK,
    )


def test_each_status_carries_its_tightest_window_and_the_denial_says_why() -> None:
    asked = request(
        descriptor(tenant="t", resource="messages"),
        descriptor(tenant="t", resource="tool_calls"),
        descriptor(unrelated="x"),
    )
    parsed = parse(asked, "quota", "f")
    roomy = Decision(
        True,
        Reason.ALLOWED,
        (
            window(Period.DAILY, 100, 10, timedelta(hours=5)),
            window(Period.MONTHLY, 1000, 990, timedelta(days=3)),
        ),
    )
    over = Decision(
        False,
        Reason.QUOTA_EXCEEDED,
        (window(Period.OVERALL, 5, 5, None),),
        message="Overall tool_calls limit of 5 reached ≤ now",
    )
    answer = respond(asked, parsed, GroupDecision(False, (roomy, over)), NOW)
    assert answer.overall_code == Code.OVER_LIMIT
    first, second, third = answer.statuses
    assert first.code == Code.OK and first.limit_remaining == 10
    assert (first.current_limit.requests_per_unit, first.current_limit.unit) == (1000, Unit.MONTH)
    assert first.duration_until_reset.seconds == 3 * 86400
    assert second.code == Code.OVER_LIMIT and second.limit_remaining == 0
    assert second.current_limit.unit == Unit.UNKNOWN and not second.HasField("duration_until_reset")
    assert third.code == Code.OK and not third.HasField("current_limit")
    headers = {h.key: h.value for h in answer.response_headers_to_add}
    assert headers == {
        "x-quota-reason": "quota_exceeded",
        "x-quota-message": "Overall tool_calls limit of 5 reached <= now",
    }
    allowed = respond(asked, parsed, GroupDecision(True, (roomy, roomy)), NOW)
    assert allowed.overall_code == Code.OK and not allowed.response_headers_to_add
