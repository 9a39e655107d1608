"""No secret in logs or error bodies: the whole stack (local Stripe, control plane, sidecar)
runs as processes with known secrets and debug logging; every surface is driven, failures
included — wrong and almost-right keys and tokens, bad signatures, a webhook that fails,
a read key that tries to write, sign-in with each — and everything captured (every log
line of every process, every response's headers and body, every gRPC error) is scanned
for each secret."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
from quota.v1 import quota_service_pb2 as pb
from quota.v1 import quota_service_pb2_grpc as pb_grpc

from billing_core.billing.api_keys import create_api_key
from billing_core.db.unit_of_work import Database
from stripe_emulator.webhooks import sign
from tests.billing.conftest import pay
from tests.conftest import fresh_database
from tests.reliability.harness import (
    Process,
    free_port,
    pool_of,
    report,
    running,
    sidecar,
    wait_http,
)


def _secrets() -> dict[str, str]:
    return {
        "stripe_key": "sk_test_" + secrets.token_hex(20),
        "webhook_secret": "whsec_" + secrets.token_hex(20),
        "link_secret": "link-" + secrets.token_hex(24),
        "caller_token": "tok-" + secrets.token_hex(20),
        "admin_key": "",  # issued below
        "read_key": "",
    }


async def test_no_secret_reaches_a_log_or_an_answer(server_url: str, tmp_path: Path) -> None:
    known = _secrets()
    captured: list[str] = []

    def keep(r: httpx.Response) -> httpx.Response:
        captured.append(f"{r.request.method} {r.request.url} -> {r.status_code}")
        captured.append(json.dumps(dict(r.headers)))
        captured.append(r.text)
        return r

    with fresh_database(server_url, "bp_secrets") as url:
        async with pool_of(url) as pool, Database(pool).transaction() as uow:
            now = datetime.now(UTC)
            known["admin_key"] = (await create_api_key(uow, "ops", "tests", now)).key
            known["read_key"] = (
                await create_api_key(uow, "reader", "tests", now, scope="read")
            ).key
        em_port, cp_port = free_port(), free_port()
        common = {
            "DATABASE_URL": url,
            "LOG_LEVEL": "debug",
            "STRIPE_EMULATOR_PORT": str(em_port),
            "STRIPE_EMULATOR_KEY": known["stripe_key"],
            "STRIPE_WEBHOOK_SECRET": known["webhook_secret"],
            "STRIPE_WEBHOOK_URL": f"http://127.0.0.1:{cp_port}/webhooks/stripe",
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{cp_port}",
            "BILLING_LINK_SECRET": known["link_secret"],
            "CONTROL_PLANE_PORT": str(cp_port),
            "QUOTA_AUTH_TOKEN": known["caller_token"],
        }
        emulator = Process("stripe_emulator", common, tmp_path / "emulator.log")
        control = Process("control_plane", common, tmp_path / "control-plane.log", ("serve",))
        side = sidecar(url, tmp_path / "sidecar.log", **{**common, "DATABASE_URL": url})
        processes = (emulator, control, side)
        with running(*processes):
            for p in processes:
                p.start()
            await wait_http(f"http://127.0.0.1:{em_port}/healthz")
            await wait_http(f"http://127.0.0.1:{cp_port}/healthz")
            await side.serving()
            await _drive_http(f"http://127.0.0.1:{cp_port}", known, keep)
            captured.extend(await _drive_grpc(side.target, known["caller_token"]))
            await asyncio.sleep(0.5)  # the last log lines
        logs = {p.module: p.output() for p in processes}
    assert logs["control_plane"] and logs["quota_service"], "nothing logged: was it driven?"
    everything = "\n".join([*captured, *logs.values()])
    leaks = {name: s for name, s in known.items() if s and s in everything}
    assert leaks == {}, [_context(everything, s) for s in leaks.values()]
    report(
        "no secret in logs or answers: every surface driven with known secrets",
        bad_inputs=len(captured) // 3,
        lost=0,
        counted_twice=0,
        applied_twice=0,
        notes=f"{len(known)} secrets looked for in {len(everything):,} characters of logs"
        " and answers: none found",
    )


def _context(text: str, secret: str) -> str:
    at = text.index(secret)
    return text[max(0, at - 200) : at + len(secret) + 50]


async def _drive_http(base: str, known: dict[str, str], keep: Any) -> None:
    admin = {"Authorization": f"Bearer {known['admin_key']}"}
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        # the API with the right key, a read key, wrong and almost-right keys
        plan = keep(
            await http.post(
                "/v1/plans",
                json={
                    "name": "Leak-free",
                    "price_cents": 900,
                    "quotas": [{"resource": "messages", "period": "daily", "limit": 3}],
                },
                headers=admin,
            )
        ).json()
        keep(await http.post("/v1/tenants", json={"tenant_id": "leak", "name": "L"}, headers=admin))
        for key in (known["read_key"], known["admin_key"] + "x", known["admin_key"][:-1], "nope"):
            keep(
                await http.post(
                    "/v1/plans", json={"name": "x"}, headers={"Authorization": f"Bearer {key}"}
                )
            )
            keep(await http.get("/v1/plans", headers={"Authorization": f"Bearer {key}"}))
        keep(await http.get("/v1/plans", headers={"Authorization": known["admin_key"]}))
        keep(await http.get("/v1/tenants/nobody", headers=admin))
        keep(await http.post("/v1/plans", content=b"{not json", headers=admin))
        # checkout through the local Stripe, paid; its webhooks come signed
        r = keep(
            await http.post(
                "/v1/tenants/leak/checkout-sessions",
                json={"plan_id": plan["plan_id"]},
                headers=admin,
            )
        )
        keep(await pay(r.json()["url"], card="4000 0000 0000 0002"))  # declined
        keep(await pay(r.json()["url"]))
        keep(await http.post("/v1/tenants/leak/portal-sessions", json={}, headers=admin))
        for _ in range(50):
            sub = keep(await http.get("/v1/tenants/leak/subscription", headers=admin)).json()
            if sub.get("status") == "active":
                break
            await asyncio.sleep(0.1)
        assert sub["status"] == "active", sub  # the local Stripe's signed webhooks came
        # webhooks: unsigned, wrongly signed, signed with an almost-right secret, and one
        # rightly signed that fails (its customer is nobody's)
        event = {"id": "evt_leak_1", "type": "invoice.paid", "created": 1, "data": {"object": {
            "id": "in_1", "object": "invoice", "customer": "cus_nobody"}}}  # fmt: skip
        body = json.dumps(event).encode()
        for signature in ("", "t=1,v1=00", sign(body, known["webhook_secret"] + "x"),
                          sign(body, known["webhook_secret"])):  # fmt: skip
            keep(
                await http.post(
                    "/webhooks/stripe", content=body, headers={"Stripe-Signature": signature}
                )
            )
        # a billing link, followed; a forged one
        link = keep(
            await http.post("/v1/tenants/leak/billing-links", json={}, headers=admin)
        ).json()
        async with httpx.AsyncClient(timeout=30, follow_redirects=True) as browser:
            keep(await browser.get(link["url"]))
            keep(await browser.get(re.sub(r"token=[^&]+", "token=forged", link["url"])))
            keep(await browser.get(f"{base}/billing"))
            # admin sign-in with each key and with an almost-right one
            for key in (known["admin_key"] + "x", known["read_key"], known["admin_key"]):
                page = keep(await browser.get(f"{base}/admin/login"))
                token = re.search(r'name="csrf" value="([^"]+)"', page.text)
                assert token is not None
                keep(await browser.post(
                    f"{base}/admin/login", data={"csrf": token.group(1), "api_key": key, "next": ""}
                ))  # fmt: skip
            for path in ("/admin", "/admin/tenants/leak", "/admin/webhooks", "/admin/audit"):
                assert keep(await browser.get(f"{base}{path}")).status_code == 200, path
        keep(await http.get("/metrics"))
        keep(await http.get("/v1/webhook-events?status=failed", headers=admin))


async def _drive_grpc(target: str, token: str) -> list[str]:
    out: list[str] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub: Any = pb_grpc.QuotaServiceStub(channel)
        for given in (token, token + "x", token[:-1], ""):
            for n in range(2):
                try:
                    answer = await stub.CheckAndConsume(
                        pb.CheckAndConsumeRequest(
                            tenant_id="leak" if n else "nobody", resource="messages",
                            amount=1, request_id=f"g{n}-{len(given)}",
                        ),
                        metadata=(("authorization", f"Bearer {given}"),) if given else None,
                        timeout=5,
                    )  # fmt: skip
                    out.append(str(answer))
                except grpc.aio.AioRpcError as exc:
                    out.append(f"{exc.code()} {exc.details()} {exc.trailing_metadata()}")
    return out
