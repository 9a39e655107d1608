"""A request's fingerprint is stored with its idempotency key, so its text must never change:
the hand-written canonical form equals json.dumps(sort_keys=True) of the request's body,
which is what earlier versions stored."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from billing_core.quota.requests import ConsumeRequest
from billing_core.rules.pricing import TokenUsage

TEXT = st.text(max_size=12)
COUNTS = st.integers(min_value=0, max_value=2**62)


def reference(req: ConsumeRequest, operation: str, extra: dict[str, Any]) -> str:
    tokens = req.tokens
    body = {
        "op": operation,
        "resource": req.resource,
        "amount": req.amount,
        "tokens": None
        if tokens is None
        else [tokens.provider, tokens.model, tokens.input_tokens, tokens.output_tokens],
        "labels": dict(sorted(req.labels.items())),
        **extra,
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


@given(
    resource=TEXT,
    amount=st.integers(min_value=1, max_value=2**62),
    tokens=st.none() | st.builds(TokenUsage, TEXT, TEXT, COUNTS, COUNTS),
    labels=st.dictionaries(TEXT, TEXT, max_size=4),
    operation=st.sampled_from(["consume", "reserve", 'x\u00e9"\\']),
    extra=st.sampled_from([{}, {"ttl": 300}]),
)
def test_fingerprint_is_the_sha256_of_the_sorted_json_body(
    resource: str,
    amount: int,
    tokens: TokenUsage | None,
    labels: dict[str, str],
    operation: str,
    extra: dict[str, Any],
) -> None:
    req = ConsumeRequest("t", resource, amount, "r", tokens=tokens, labels=labels)
    assert req.fingerprint(operation, extra) == reference(req, operation, extra)


def test_fingerprint_tells_requests_apart() -> None:
    a = ConsumeRequest("t", "tokens", 5, "r", labels={"agent": "a"})
    assert a.fingerprint("consume") != ConsumeRequest("t", "tokens", 6, "r").fingerprint("consume")
    assert a.fingerprint("consume") != a.fingerprint("consume", {"ttl": 300})
