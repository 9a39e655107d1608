"""A schemathesis check for the control plane: data the schema admits never fails the
request validator. The schema states the shape of every input; rules it cannot state —
time (an expiry in the future, `since` before `until`), uniqueness within a list (one quota
per resource and period), an Idempotency-Key reused with another body — are refused with
422 `/problems/invalid-request` and a sentence, which schemathesis.toml accepts. A 422
`/problems/validation-error` for schema-valid data is a schema that says too little: a
failure."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.check
def schema_valid_input_passes_the_validator(ctx: Any, response: Any, case: Any) -> bool | None:
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive or response.status_code != 422:
        return None
    try:
        kind = response.json().get("type")
    except ValueError:
        kind = None
    if kind == "/problems/validation-error":
        raise AssertionError(f"schema-valid input refused by the validator: {response.text[:500]}")
    return None
