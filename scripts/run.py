"""`make run`: database (embedded unless DATABASE_URL), migrations, demo data once, then the
sidecar and the control plane as child processes until Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from billing_core.billing import demo  # noqa: E402
from billing_core.billing.api_keys import create_api_key  # noqa: E402
from billing_core.db.embedded import ensure_database, start_embedded  # noqa: E402
from billing_core.db.migrate import upgrade  # noqa: E402
from billing_core.db.unit_of_work import Database  # noqa: E402
from billing_core.settings import Settings  # noqa: E402

DATA = ROOT / ".data"


async def _prepare(database_url: str) -> str:
    """Seed once and make sure an admin key exists; return the key to print."""
    now = datetime.now(UTC)
    db = await Database.open(database_url, 1)
    try:
        async with db.transaction() as uow:
            await demo.seed_demo(uow, now)
            key = os.environ.get("ADMIN_API_KEY", "").strip()
            key_file = DATA / "admin_api_key"
            if not key and key_file.exists():
                key = key_file.read_text().strip()
            key = (await create_api_key(uow, "make-run", "make-run", now, key or None)).key
        if not os.environ.get("ADMIN_API_KEY"):
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
        return key
    finally:
        await db.close()


def _kept_secret(name: str, prefix: str = "whsec_") -> str:
    """A generated secret kept in .data/ so that restarts keep using it."""
    path = DATA / name
    if path.exists():
        return path.read_text().strip()
    secret = prefix + secrets.token_hex(24)
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return secret


def _wait_for_grpc(address: str, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                time.sleep(0.2)
    return False


def _demo_billing_link(base_url: str, key: str, timeout_s: float) -> str:
    """A billing link for the demo tenant acme (valid a day), once the control plane is
    ready; how it failed otherwise."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}) as http:
        while True:
            try:
                if http.get("/readyz").status_code == 200:
                    r = http.post(
                        "/v1/tenants/acme/billing-links", json={"expires_in_seconds": 86_400}
                    )
                    return str(r.json()["url"]) if r.status_code == 201 else f"({r.text[:200]})"
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                return "(the control plane is not ready)"
            time.sleep(0.2)


def main() -> int:
    DATA.mkdir(exist_ok=True)
    settings = Settings.from_env()
    server: Any = None
    if settings.database_url:
        database_url = settings.database_url
        where = "DATABASE_URL"
    else:
        server, server_url = start_embedded(DATA / "pg")
        database_url = ensure_database(server_url, "billing")
        where = f"embedded PostgreSQL 18, data in {DATA / 'pg'}"
    upgrade(database_url)
    key = asyncio.run(_prepare(database_url))
    if settings.stripe_secret_key and not settings.stripe_webhook_secret:
        print(
            "warning: STRIPE_SECRET_KEY is set but STRIPE_WEBHOOK_SECRET is not: real Stripe's "
            "webhooks will be rejected until you set the endpoint's signing secret",
            file=sys.stderr,
        )
    webhook_secret = settings.stripe_webhook_secret or _kept_secret("stripe_webhook_secret")
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "STRIPE_WEBHOOK_SECRET": webhook_secret,
        "BILLING_LINK_SECRET": settings.billing_link_secret
        or _kept_secret("billing_link_secret", "bls_"),
        "STRIPE_WEBHOOK_URL": settings.stripe_webhook_url,
        # the emulator's objects survive restarts like the database does
        "STRIPE_EMULATOR_STATE": settings.stripe_emulator_state
        or str(DATA / "stripe_emulator.json"),
    }
    commands = [["quota_service"], ["control_plane", "serve"]]
    if not settings.stripe_secret_key:
        commands.append(["stripe_emulator"])  # real Stripe when STRIPE_SECRET_KEY is set
    children = [
        subprocess.Popen([sys.executable, "-m", *command], env=env, cwd=ROOT)
        for command in commands
    ]
    grpc_address = f"{settings.grpc_host}:{settings.grpc_port}"
    secret_from = (
        "STRIPE_WEBHOOK_SECRET"
        if settings.stripe_webhook_secret
        else str(DATA / "stripe_webhook_secret")
    )
    stripe_where = (
        "real Stripe (STRIPE_SECRET_KEY)"
        if settings.stripe_secret_key
        else f"local emulator http://{settings.stripe_emulator_host}:{settings.stripe_emulator_port}"
        " (test cards 4242 4242 4242 4242, 4000 0000 0000 0002, 4000 0000 0000 0341)"
    )
    serving = _wait_for_grpc(grpc_address, 20)
    http_base = f"http://{settings.http_host}:{settings.http_port}"
    link = _demo_billing_link(http_base, key, 20)
    print(
        "\n".join(
            [
                "",
                "billing platform running:",
                f"  database       {where}",
                f"                 {database_url}",
                f"  quota sidecar  grpc://{grpc_address}  (health: "
                f"{'SERVING' if serving else 'NOT SERVING'})",
                f"  sidecar metrics http://{settings.grpc_host}:{settings.metrics_port}/metrics",
                f"  control plane  http://{settings.http_host}:{settings.http_port}"
                "  (/healthz, /readyz, /metrics)",
                f"  admin pages    {http_base}/admin  (sign in with the admin API key)",
                f"  billing pages  {link}",
                "                 (acme's, valid a day; POST /v1/tenants/{id}/billing-links)",
                f"  admin API key  {key}",
                f"  Stripe         {stripe_where}",
                f"  webhooks       {settings.stripe_webhook_url} (secret in {secret_from})",
                "Ctrl-C stops everything.",
                "",
            ]
        ),
        flush=True,
    )
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        if server is not None:
            server.cleanup()
        print("stopped.", flush=True)
    failed = [c.args for c in children if c.returncode not in (0, -signal.SIGTERM, None)]
    return 1 if failed and not stopping else 0


if __name__ == "__main__":
    sys.exit(main())
