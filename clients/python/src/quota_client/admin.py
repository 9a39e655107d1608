"""Typed clients for the control plane's HTTP API (`pip install 'quota-client[http]'`).

    from quota_client.admin import AdminClient
    with AdminClient("http://127.0.0.1:8000", api_key) as admin:
        plan = admin.create_plan(name="Team", price_cents=9900, quotas=[...])
        admin.put_subscription("acme", plan["plan_id"])

OPERATIONS mirrors /openapi.json (a test compares them): every operation has a method of
the same name on both clients. Errors raise ApiError with the problem+json fields.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Self
from urllib.parse import quote

import httpx

JSON = dict[str, Any]

# operationId → (method, path template)
OPERATIONS: dict[str, tuple[str, str]] = {
    "list_plans": ("GET", "/v1/plans"),
    "create_plan": ("POST", "/v1/plans"),
    "get_plan": ("GET", "/v1/plans/{plan_id}"),
    "update_plan": ("PATCH", "/v1/plans/{plan_id}"),
    "archive_plan": ("POST", "/v1/plans/{plan_id}/archive"),
    "list_tenants": ("GET", "/v1/tenants"),
    "create_tenant": ("POST", "/v1/tenants"),
    "get_tenant": ("GET", "/v1/tenants/{tenant_id}"),
    "get_subscription": ("GET", "/v1/tenants/{tenant_id}/subscription"),
    "put_subscription": ("PUT", "/v1/tenants/{tenant_id}/subscription"),
    "start_trial": ("POST", "/v1/tenants/{tenant_id}/trial"),
    "get_overrides": ("GET", "/v1/tenants/{tenant_id}/overrides"),
    "put_overrides": ("PUT", "/v1/tenants/{tenant_id}/overrides"),
    "get_usage": ("GET", "/v1/tenants/{tenant_id}/usage"),
    "list_usage_records": ("GET", "/v1/tenants/{tenant_id}/usage-records"),
    "list_notifications": ("GET", "/v1/tenants/{tenant_id}/notifications"),
    "get_wallet": ("GET", "/v1/tenants/{tenant_id}/wallet"),
    "create_wallet_grant": ("POST", "/v1/tenants/{tenant_id}/wallet/grants"),
    "list_model_prices": ("GET", "/v1/model-prices"),
    "put_model_price": ("PUT", "/v1/model-prices/{provider}/{model}"),
    "list_audit_entries": ("GET", "/v1/audit-log"),
    "list_api_keys": ("GET", "/v1/api-keys"),
    "create_api_key": ("POST", "/v1/api-keys"),
    "revoke_api_key": ("POST", "/v1/api-keys/{api_key_id}/revoke"),
    "create_billing_link": ("POST", "/v1/tenants/{tenant_id}/billing-links"),
    "create_checkout_session": ("POST", "/v1/tenants/{tenant_id}/checkout-sessions"),
    "create_portal_session": ("POST", "/v1/tenants/{tenant_id}/portal-sessions"),
    "change_subscription_plan": ("POST", "/v1/tenants/{tenant_id}/subscription/change"),
    "cancel_subscription": ("POST", "/v1/tenants/{tenant_id}/subscription/cancel"),
    "list_webhook_events": ("GET", "/v1/webhook-events"),
    "reprocess_webhook_event": ("POST", "/v1/webhook-events/{event_id}/reprocess"),
}


class ApiError(Exception):
    """A problem+json answer (RFC 9457) from the control plane."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.type = str(body.get("type", ""))
        self.detail = str(body.get("detail", ""))
        self.errors: list[dict[str, Any]] = list(body.get("errors") or [])
        super().__init__(f"{status} {self.type}: {self.detail}")


def _url(operation: str, **path: str) -> tuple[str, str]:
    method, template = OPERATIONS[operation]
    return method, template.format(**{k: quote(v, safe="") for k, v in path.items()})


def _params(**values: Any) -> dict[str, Any]:
    return {
        k: (str(v).lower() if isinstance(v, bool) else v)
        for k, v in values.items()
        if v is not None
    }


def _result(response: httpx.Response) -> JSON:
    try:
        body = response.json()
    except ValueError:
        body = {"detail": response.text}
    if response.is_error:
        raise ApiError(response.status_code, body)
    result: JSON = body
    return result


def _idem(key: str | None) -> dict[str, str]:
    return {"Idempotency-Key": key} if key else {}


class AdminClient:
    """Synchronous client; one method per API operation."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 10.0) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(
        self,
        operation: str,
        *,
        path: Mapping[str, str] | None = None,
        json: JSON | None = None,
        params: JSON | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> JSON:
        method, url = _url(operation, **(path or {}))
        return _result(self._http.request(method, url, json=json, params=params, headers=headers))

    def _pages(self, operation: str, path: Mapping[str, str], params: JSON) -> Iterator[JSON]:
        cursor = None
        while True:
            page = self._call(operation, path=path, params={**params, **_params(cursor=cursor)})
            yield from page["items"]
            cursor = page["next_cursor"]
            if not cursor:
                return

    # plans
    def list_plans(
        self, *, limit: int = 50, cursor: str | None = None, active: bool | None = None
    ) -> JSON:
        return self._call("list_plans", params=_params(limit=limit, cursor=cursor, active=active))

    def iter_plans(self, *, active: bool | None = None) -> Iterator[JSON]:
        return self._pages("list_plans", {}, _params(limit=200, active=active))

    def create_plan(self, **plan: Any) -> JSON:
        return self._call("create_plan", json=plan)

    def get_plan(self, plan_id: str) -> JSON:
        return self._call("get_plan", path={"plan_id": plan_id})

    def update_plan(self, plan_id: str, **changes: Any) -> JSON:
        return self._call("update_plan", path={"plan_id": plan_id}, json=changes)

    def archive_plan(self, plan_id: str) -> JSON:
        return self._call("archive_plan", path={"plan_id": plan_id})

    # tenants and subscriptions
    def list_tenants(self, *, limit: int = 50, cursor: str | None = None) -> JSON:
        return self._call("list_tenants", params=_params(limit=limit, cursor=cursor))

    def iter_tenants(self) -> Iterator[JSON]:
        return self._pages("list_tenants", {}, _params(limit=200))

    def create_tenant(
        self, tenant_id: str, name: str, *, email: str = "", timezone: str = "UTC"
    ) -> JSON:
        body = {"tenant_id": tenant_id, "name": name, "email": email, "timezone": timezone}
        return self._call("create_tenant", json=body)

    def get_tenant(self, tenant_id: str) -> JSON:
        return self._call("get_tenant", path={"tenant_id": tenant_id})

    def get_subscription(self, tenant_id: str) -> JSON:
        return self._call("get_subscription", path={"tenant_id": tenant_id})

    def put_subscription(
        self, tenant_id: str, plan_id: str, *, idempotency_key: str | None = None
    ) -> JSON:
        return self._call(
            "put_subscription",
            path={"tenant_id": tenant_id},
            json={"plan_id": plan_id},
            headers=_idem(idempotency_key),
        )

    def start_trial(
        self, tenant_id: str, plan_id: str, *, idempotency_key: str | None = None
    ) -> JSON:
        return self._call(
            "start_trial",
            path={"tenant_id": tenant_id},
            json={"plan_id": plan_id},
            headers=_idem(idempotency_key),
        )

    def get_overrides(self, tenant_id: str) -> JSON:
        return self._call("get_overrides", path={"tenant_id": tenant_id})

    def put_overrides(self, tenant_id: str, quotas: list[JSON]) -> JSON:
        return self._call("put_overrides", path={"tenant_id": tenant_id}, json={"quotas": quotas})

    # usage
    def get_usage(self, tenant_id: str) -> JSON:
        return self._call("get_usage", path={"tenant_id": tenant_id})

    def list_usage_records(
        self,
        tenant_id: str,
        *,
        resource: str | None = None,
        since: str | None = None,
        until: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JSON:
        params = _params(resource=resource, since=since, until=until, limit=limit, cursor=cursor)
        return self._call("list_usage_records", path={"tenant_id": tenant_id}, params=params)

    def export_usage_csv(self, tenant_id: str, *, resource: str | None = None) -> Iterator[str]:
        """The records as CSV lines, streamed (header first)."""
        method, url = _url("list_usage_records", tenant_id=tenant_id)
        params = _params(resource=resource)
        with self._http.stream(
            method, url, params=params, headers={"Accept": "text/csv"}
        ) as response:
            if response.is_error:
                response.read()
                _result(response)
            yield from response.iter_lines()

    def list_notifications(
        self, tenant_id: str, *, limit: int = 50, cursor: str | None = None
    ) -> JSON:
        return self._call(
            "list_notifications",
            path={"tenant_id": tenant_id},
            params=_params(limit=limit, cursor=cursor),
        )

    # wallet and prices
    def get_wallet(self, tenant_id: str, *, limit: int = 50, cursor: str | None = None) -> JSON:
        return self._call(
            "get_wallet", path={"tenant_id": tenant_id}, params=_params(limit=limit, cursor=cursor)
        )

    def create_wallet_grant(
        self,
        tenant_id: str,
        amount_micros: int,
        reason: str,
        *,
        expires_at: str | None = None,
        idempotency_key: str | None = None,
    ) -> JSON:
        body: JSON = {"amount_micros": amount_micros, "reason": reason}
        if expires_at:
            body["expires_at"] = expires_at
        return self._call(
            "create_wallet_grant",
            path={"tenant_id": tenant_id},
            json=body,
            headers=_idem(idempotency_key),
        )

    def list_model_prices(
        self,
        *,
        provider: str | None = None,
        model: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JSON:
        params = _params(provider=provider, model=model, limit=limit, cursor=cursor)
        return self._call("list_model_prices", params=params)

    def put_model_price(
        self,
        provider: str,
        model: str,
        input_micros_per_million: int,
        output_micros_per_million: int,
        *,
        effective_from: str | None = None,
    ) -> JSON:
        body: JSON = {
            "input_micros_per_million": input_micros_per_million,
            "output_micros_per_million": output_micros_per_million,
        }
        if effective_from:
            body["effective_from"] = effective_from
        return self._call("put_model_price", path={"provider": provider, "model": model}, json=body)

    # payments
    def create_billing_link(
        self,
        tenant_id: str,
        *,
        return_url: str | None = None,
        expires_in_seconds: int = 900,
        opens: str = "overview",
    ) -> JSON:
        """{url, expires_at}: send the signed-in user's browser to url to open the tenant's
        billing pages on `opens` (overview, plans, or limits/<resource> after a denial); the
        link expires, the session it opens lasts hours."""
        body: dict[str, Any] = {"expires_in_seconds": expires_in_seconds, "opens": opens}
        if return_url is not None:
            body["return_url"] = return_url
        return self._call("create_billing_link", path={"tenant_id": tenant_id}, json=body)

    def create_checkout_session(
        self, tenant_id: str, plan_id: str, *, idempotency_key: str | None = None
    ) -> JSON:
        """{session_id, url}: send the browser to url; the plan starts when Stripe confirms."""
        return self._call(
            "create_checkout_session",
            path={"tenant_id": tenant_id},
            json={"plan_id": plan_id},
            headers=_idem(idempotency_key),
        )

    def create_portal_session(self, tenant_id: str) -> JSON:
        return self._call("create_portal_session", path={"tenant_id": tenant_id}, json={})

    def change_subscription_plan(
        self, tenant_id: str, plan_id: str, *, idempotency_key: str | None = None
    ) -> JSON:
        return self._call(
            "change_subscription_plan",
            path={"tenant_id": tenant_id},
            json={"plan_id": plan_id},
            headers=_idem(idempotency_key),
        )

    def cancel_subscription(self, tenant_id: str, *, cancel_at_period_end: bool = True) -> JSON:
        return self._call(
            "cancel_subscription",
            path={"tenant_id": tenant_id},
            json={"cancel_at_period_end": cancel_at_period_end},
        )

    def list_webhook_events(
        self, *, status: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> JSON:
        params = _params(status=status, limit=limit, cursor=cursor)
        return self._call("list_webhook_events", params=params)

    def reprocess_webhook_event(self, event_id: str) -> JSON:
        return self._call("reprocess_webhook_event", path={"event_id": event_id})

    # API keys
    def list_api_keys(self, *, limit: int = 50, cursor: str | None = None) -> JSON:
        return self._call("list_api_keys", params=_params(limit=limit, cursor=cursor))

    def create_api_key(self, name: str, *, scope: str = "admin") -> JSON:
        """{api_key_id, …, key}: the key is in this answer only."""
        return self._call("create_api_key", json={"name": name, "scope": scope})

    def revoke_api_key(self, api_key_id: str) -> JSON:
        return self._call("revoke_api_key", path={"api_key_id": api_key_id})

    # audit
    def list_audit_entries(
        self,
        *,
        actor: str | None = None,
        action: str | None = None,
        entity_type: str | None = None,
        entity_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JSON:
        params = _params(
            actor=actor,
            action=action,
            entity_type=entity_type,
            entity_id=entity_id,
            limit=limit,
            cursor=cursor,
        )
        return self._call("list_audit_entries", params=params)


class AsyncAdminClient:
    """The asyncio twin of AdminClient: the same operations, awaited."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 10.0) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(
        self,
        operation: str,
        *,
        path: Mapping[str, str] | None = None,
        json: JSON | None = None,
        params: JSON | None = None,
        idempotency_key: str | None = None,
    ) -> JSON:
        """Any operation by its operationId (see OPERATIONS)."""
        method, url = _url(operation, **(path or {}))
        response = await self._http.request(
            method, url, json=json, params=params, headers=_idem(idempotency_key)
        )
        return _result(response)

    async def iter_pages(
        self, operation: str, path: Mapping[str, str] | None = None, **params: Any
    ) -> AsyncIterator[JSON]:
        cursor = None
        while True:
            page = await self.call(
                operation, path=path, params={**_params(**params), **_params(cursor=cursor)}
            )
            for item in page["items"]:
                yield item
            cursor = page["next_cursor"]
            if not cursor:
                return
