"""envoy.service.ratelimit.v3.RateLimitService: Envoy's global rate-limit protocol, decided
by the same core as CheckAndConsume.

Each descriptor names a quota with its entries: `tenant` and `resource` (both required),
`member` (recorded on the usage record as the label `member`) and `request_id` (the
route adds it from `x-request-id`, so that a retried HTTP request counts once); its
`hits_addend` (or the request's) is the amount, 1 when unset. The counted descriptors of
one request are decided all-or-nothing: unless every one is allowed, none counts.
A request of another domain, and a descriptor without `tenant` and `resource`, is answered
OK and counted nowhere (as Envoy's own service answers descriptors it has no rule for),
and logged. An unknown tenant, descriptors naming several tenants and invalid entries are
OVER_LIMIT, with the reason in the `x-quota-reason` and `x-quota-message` headers; a
database that cannot be reached is UNAVAILABLE, which Envoy's `failure_mode_deny` decides.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.ratelimit.v3 import rls_pb2
from google.protobuf import duration_pb2

from billing_core.clock import Clock
from billing_core.errors import InvalidRequest, NotFound, QuotaError
from billing_core.ids import new_id
from billing_core.quota.answers import Decision, GroupDecision
from billing_core.quota.requests import MAX_REQUEST_ID, AdmitAllRequest, ConsumeRequest
from billing_core.rules.resources import Period
from quota_service.metrics import Metrics
from quota_service.servicer import rpc_handler, timed_call

log = structlog.get_logger(__name__)
SERVICE_NAME = rls_pb2.DESCRIPTOR.services_by_name["RateLimitService"].full_name
METHOD = "ShouldRateLimit"
Code = rls_pb2.RateLimitResponse.Code
Unit = rls_pb2.RateLimitResponse.RateLimit.Unit
UNIT_FOR: dict[Period, int] = {
    Period.DAILY: Unit.DAY,
    Period.WEEKLY: Unit.WEEK,
    Period.MONTHLY: Unit.MONTH,
    Period.OVERALL: Unit.UNKNOWN,
    Period.CUMULATIVE: Unit.UNKNOWN,
}
MAX_AMOUNT = 1 << 53  # counters are BIGINT; larger hits are a misconfigured route
MAX_UINT32 = (1 << 32) - 1
MAX_HEADER = 512
AdmitAll = Callable[[AdmitAllRequest], Awaitable[GroupDecision]]


@dataclass(frozen=True, slots=True)
class Parsed:
    """What a RateLimitRequest asks: the descriptors counted (by position) and the group
    they are decided in, or why the whole request is refused without deciding."""

    counted: tuple[int, ...] = ()
    group: AdmitAllRequest | None = None
    refusal: tuple[str, str] | None = None  # reason, message


def parse(request: rls_pb2.RateLimitRequest, domain: str, fresh_id: str) -> Parsed:
    """The descriptors this sidecar counts, as one all-or-nothing group; `fresh_id` stands
    for the request_id of descriptors without one (counted every time they come)."""
    if request.domain != domain:
        log.info("rls_domain_ignored", domain=request.domain[:128], counted_domain=domain)
        return Parsed()
    counted: list[int] = []
    members: list[ConsumeRequest] = []
    for i, descriptor in enumerate(request.descriptors):
        entries: dict[str, str] = {}
        for entry in descriptor.entries:
            entries.setdefault(entry.key, entry.value)
        tenant, resource = entries.get("tenant", ""), entries.get("resource", "")
        if not tenant or not resource:
            log.info("rls_descriptor_ignored", keys=sorted(entries)[:16], index=i)
            continue
        amount = (descriptor.hits_addend.value if descriptor.HasField("hits_addend") else 0) or (
            request.hits_addend or 1
        )
        if amount > MAX_AMOUNT:
            return Parsed((*counted, i), refusal=("invalid_request", f"hits_addend {amount}"))
        member = entries.get("member", "")
        counted.append(i)
        members.append(
            ConsumeRequest(
                tenant,
                resource,
                amount,
                _request_id(entries.get("request_id", "") or fresh_id, i),
                labels={"member": member} if member else {},
            )
        )
    if not members:
        return Parsed()
    tenants = {m.tenant_id for m in members}
    if len(tenants) > 1:
        message = "the descriptors of one request name several tenants"
        return Parsed(tuple(counted), refusal=("invalid_request", message))
    return Parsed(tuple(counted), AdmitAllRequest(members[0].tenant_id, tuple(members)))


def _request_id(request_id: str, index: int) -> str:
    """The descriptor's own request_id: the HTTP request's, with its position."""
    if len(request_id) > MAX_REQUEST_ID - 16:
        request_id = hashlib.sha256(request_id.encode()).hexdigest()
    return f"rls:{request_id}:{index}"


def respond(
    request: rls_pb2.RateLimitRequest,
    parsed: Parsed,
    decided: GroupDecision | None,
    now: datetime | None = None,
) -> rls_pb2.RateLimitResponse:
    """OK or OVER_LIMIT, with a status per descriptor in their order: for a counted one its
    tightest window's limit, what is left of it and when it resets."""
    statuses = [
        rls_pb2.RateLimitResponse.DescriptorStatus(code=Code.OK) for _ in request.descriptors
    ]
    if parsed.refusal is not None:
        for i in parsed.counted:
            statuses[i].code = Code.OVER_LIMIT
        return _answer(False, statuses, *parsed.refusal)
    if decided is None:
        return _answer(True, statuses)
    assert now is not None
    for i, decision in zip(parsed.counted, decided.members, strict=True):
        _describe(statuses[i], decision, now)
    if decided.allowed:
        return _answer(True, statuses)
    denial = next(d for d in decided.members if not d.allowed)
    return _answer(False, statuses, denial.reason.value, denial.message)


def refused(
    request: rls_pb2.RateLimitRequest, parsed: Parsed, error: QuotaError
) -> rls_pb2.RateLimitResponse:
    """OVER_LIMIT for an unknown tenant or an invalid descriptor, with the reason."""
    reason = "unknown_tenant" if isinstance(error, NotFound) else "invalid_request"
    return respond(request, Parsed(parsed.counted, refusal=(reason, error.message)), None)


def _describe(
    status: rls_pb2.RateLimitResponse.DescriptorStatus, decision: Decision, now: datetime
) -> None:
    status.code = Code.OK if decision.allowed else Code.OVER_LIMIT
    limited = [w for w in decision.windows if not w.unlimited]
    if not limited:
        return
    tightest = min(limited, key=lambda w: (w.remaining, -w.limit))
    status.current_limit.name = f"{tightest.period.value}"
    status.current_limit.requests_per_unit = min(tightest.limit, MAX_UINT32)
    status.current_limit.unit = UNIT_FOR[tightest.period]
    status.limit_remaining = min(tightest.remaining, MAX_UINT32)
    if tightest.resets_at is not None:
        seconds = max(0, int((tightest.resets_at - now).total_seconds()))
        status.duration_until_reset.CopyFrom(duration_pb2.Duration(seconds=seconds))


def _answer(
    ok: bool,
    statuses: Sequence[rls_pb2.RateLimitResponse.DescriptorStatus],
    reason: str = "",
    message: str = "",
) -> rls_pb2.RateLimitResponse:
    headers = []
    if not ok:
        headers = [
            base_pb2.HeaderValue(key="x-quota-reason", value=reason),
            base_pb2.HeaderValue(key="x-quota-message", value=_header_text(message)),
        ]
    return rls_pb2.RateLimitResponse(
        overall_code=Code.OK if ok else Code.OVER_LIMIT,
        statuses=statuses,
        response_headers_to_add=headers,
    )


def _header_text(text: str) -> str:
    """Printable ASCII for a header value (a message may hold ≤, €, a line break)."""
    plain = text.replace("≤", "<=").replace("≥", ">=").replace("…", "...")
    ascii_only = "".join(c if " " <= c <= "~" else "?" for c in plain)
    return ascii_only[:MAX_HEADER]


class RateLimitServicer:
    """ShouldRateLimit over the engine (or the coalescer, with the other calls' batches)."""

    def __init__(self, admit_all: AdmitAll, domain: str, metrics: Metrics, clock: Clock) -> None:
        self._admit_all = admit_all
        self._domain = domain
        self._metrics = metrics
        self._clock = clock

    async def ShouldRateLimit(
        self,
        request: rls_pb2.RateLimitRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> rls_pb2.RateLimitResponse:
        async def work() -> rls_pb2.RateLimitResponse:
            now = self._clock.now()
            parsed = parse(request, self._domain, new_id("http", now))
            if parsed.group is None:
                return respond(request, parsed, None, now)
            try:
                decided = await self._admit_all(parsed.group)
            except (NotFound, InvalidRequest) as exc:
                # an invalid resource name is no label: the metric stays bounded
                self._metrics.decided(METHOD, "refused", "")
                return refused(request, parsed, exc)
            for asked, answer in zip(parsed.group.members, decided.members, strict=True):
                # a member allowed alone but not counted, for another member's denial: "group"
                reason = answer.reason.value if decided.allowed or not answer.allowed else "group"
                self._metrics.decided(METHOD, reason, asked.resource)
            return respond(request, parsed, decided, now)

        response: rls_pb2.RateLimitResponse = await timed_call(self._metrics, METHOD, context, work)
        return response


def add_to_server(servicer: RateLimitServicer, server: grpc.aio.Server) -> None:
    """Register ShouldRateLimit; bytes that are no RateLimitRequest answer INVALID_ARGUMENT."""
    handler = rpc_handler(
        servicer.ShouldRateLimit, rls_pb2.RateLimitRequest, rls_pb2.RateLimitResponse
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {METHOD: handler}),)
    )
