"""The control plane's operational and browser-facing pages: health, readiness, metrics, the
API's own documentation, and the pages the payment provider sends a browser back to."""

from __future__ import annotations

import re

import httpx

from tests.conftest import ControlPlane


async def test_health_readiness_and_metrics(control_plane: ControlPlane) -> None:
    async with httpx.AsyncClient(base_url=control_plane.url) as anyone:  # no key needed
        health = await anyone.get("/healthz")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        ready = await anyone.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready", "database": True, "migrations_current": True}
        await anyone.get("/v1/plans")  # a 401, counted by route and status
        metrics = await anyone.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    assert re.search(
        r'control_plane_requests_total\{route="/v1/plans",status="401"\} [1-9]', metrics.text
    )


async def test_the_api_documents_itself_without_a_cdn(control_plane: ControlPlane) -> None:
    async with httpx.AsyncClient(base_url=control_plane.url) as anyone:
        spec = await anyone.get("/openapi.json")
        docs = await anyone.get("/docs")
    assert spec.status_code == 200 and spec.json()["openapi"] == "3.1.0"
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    for operation in ("create_plan", "get_usage", "create_checkout_session"):
        assert operation in docs.text
    assert not re.search(r"""(src|href)=["']?https?://""", docs.text)  # nothing fetched


async def test_the_provider_return_pages_change_nothing_and_show_no_tenant_without_a_session(
    control_plane: ControlPlane,
) -> None:
    async with httpx.AsyncClient(base_url=control_plane.url) as browser:
        paid = await browser.get("/billing/return", params={"tenant": "t", "session_id": "cs"})
        canceled = await browser.get("/billing", params={"tenant": "t", "checkout": "canceled"})
        back = await browser.get("/billing", params={"tenant": "t", "from": "portal"})
    assert paid.status_code == 200
    assert "does not change your plan by itself" in paid.text
    assert canceled.status_code == back.status_code == 401  # a query string is no session
    assert "nothing was charged and your plan is unchanged" in canceled.text
    assert "This link has expired" in back.text and "nothing was charged" not in back.text
    assert all(r.headers["cache-control"] == "no-store" for r in (paid, canceled, back))
