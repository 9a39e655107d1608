"""The runnable examples of docs/integration.md (examples/) against `make run`
(scripts/run.py: migrations, demo data, sidecar, control plane, local Stripe) on free
ports and a fresh database: an executor through a sidecar outage and back, the billing
links a platform hands its users, and Envoy in front of an HTTP tool."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import fresh_database
from tests.e2e.test_envoy_ratelimit import envoy, envoy_config
from tests.reliability.harness import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


@dataclass(frozen=True)
class Running:
    sidecar: str
    control_plane: str
    key: str
    grpc_port: int


@pytest.fixture(scope="module")
def made_run(server_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`make run` (scripts/run.py) on a database of its own, until the module is done."""
    tmp = tmp_path_factory.mktemp("make-run")
    grpc_port, http_port, stripe_port = free_port(), free_port(), free_port()
    key = "bpk_examples_" + secrets.token_hex(16)
    with fresh_database(server_url, "bp_examples") as url:
        env = {
            **os.environ,
            "DATABASE_URL": url,
            "QUOTA_GRPC_PORT": str(grpc_port),
            "QUOTA_METRICS_PORT": "-1",
            "CONTROL_PLANE_PORT": str(http_port),
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{http_port}",
            "STRIPE_EMULATOR_PORT": str(stripe_port),
            "STRIPE_WEBHOOK_URL": f"http://127.0.0.1:{http_port}/webhooks/stripe",
            "STRIPE_WEBHOOK_SECRET": "whsec_" + secrets.token_hex(16),
            "STRIPE_EMULATOR_STATE": str(tmp / "stripe.json"),
            "BILLING_LINK_SECRET": "bls_" + secrets.token_hex(24),
            "ADMIN_API_KEY": key,
            "LOG_LEVEL": "warning",
        }
        proc = subprocess.Popen(
            [sys.executable, "scripts/run.py"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            seen = []
            deadline = time.monotonic() + 90
            for line in proc.stdout:
                seen.append(line)
                if "Ctrl-C stops everything." in line or time.monotonic() > deadline:
                    break
            printed = "".join(seen)
            assert "health: SERVING" in printed, printed[-3000:]
            yield Running(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", key, grpc_port)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def example(*args: str) -> list[dict[str, Any]]:
    """Run an example; its JSON lines."""
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def test_the_executor_reserves_commits_and_keeps_usage_through_an_outage(
    made_run: Running, tmp_path: Path
) -> None:
    spool = str(tmp_path / "executor.spool")
    common = ["--spool", spool, "--control-plane", made_run.control_plane, "--key", made_run.key]
    # the sidecar cannot be reached: the turns go on, their usage waits in the spool
    away = example("-m", "examples.executor", "--sidecar", f"127.0.0.1:{free_port()}",
                   *common, "first prompt", "second prompt here")  # fmt: skip
    assert [t["allowed"] and t["fell_open"] for t in away[:-1]] == [True, True]
    assert away[-1]["summary"]["spooled_waiting"] == 2
    # back: the spool is reported once, the new turns count through the sidecar
    back = example("-m", "examples.executor", "--sidecar", made_run.sidecar, *common,
                   "third", "and the fourth")  # fmt: skip
    turns = [*away[:-1], *back[:-1]]
    assert [t["fell_open"] for t in back[:-1]] == [False, False]
    assert all(t["cost_micros"] > 0 for t in back[:-1])
    summary = back[-1]["summary"]
    assert summary["spooled_waiting"] == 0
    assert summary["tokens_used_today"] == sum(t["tokens"] for t in turns)
    with httpx.Client(
        base_url=made_run.control_plane, headers={"Authorization": f"Bearer {made_run.key}"}
    ) as api:
        records = api.get("/v1/tenants/acme/usage-records", params={"limit": 100}).json()
    kinds = sorted(r["kind"] for r in records["items"] if r["resource"] == "tokens")
    assert kinds == ["commit", "commit", "fail_open", "fail_open"]

    # a turn over the free plan's daily tokens is refused, with the page that says why
    denied = example("-m", "examples.executor", "--sidecar", made_run.sidecar, *common,
                     "--tenant", "globex", "--budget", "50000", "too big")  # fmt: skip
    [turn] = denied[:-1]
    assert not turn["allowed"] and "Daily tokens limit of 20,000" in turn["reason"]
    with httpx.Client() as browser:
        opened = browser.get(turn["billing_link"])
        assert opened.status_code == 303
        assert opened.headers["location"] == "/billing/limits/tokens"
        page = browser.get(made_run.control_plane + opened.headers["location"])
    assert page.status_code == 200 and "Globex" in page.text


def test_the_billing_links_open_the_overview_and_the_limit_page(made_run: Running) -> None:
    [links] = example("-m", "examples.billing_links", "--control-plane", made_run.control_plane,
                      "--key", made_run.key, "--resource", "messages")  # fmt: skip
    with httpx.Client(follow_redirects=True) as browser:
        overview = browser.get(links["overview"])
        assert overview.status_code == 200 and "Acme Inc." in overview.text
        assert 'href="https://app.example.com/settings"' in overview.text
    with httpx.Client(follow_redirects=True) as browser:
        limit = browser.get(links["limit_page"])
    assert limit.status_code == 200 and str(limit.url).endswith("/billing/limits/messages")


def test_envoy_in_front_of_the_tool_counts_every_request_once(
    made_run: Running, tmp_path: Path
) -> None:
    tool_port, listen, admin = free_port(), free_port(), free_port()
    tool = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "envoy" / "tool.py"), "--port", str(tool_port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert tool.stdout is not None and "listening" in tool.stdout.readline()
        config = envoy_config(
            tmp_path, listen=listen, admin=admin, tool=tool_port, sidecar=made_run.grpc_port
        )
        with (
            envoy(config, admin, tmp_path / "envoy.log"),
            httpx.Client(base_url=f"http://127.0.0.1:{listen}") as http,
        ):
            # globex is on the free plan: 20 tool calls a day
            codes = [
                http.get("/search", headers={"x-tenant-id": "globex", "x-request-id": f"s-{n}"})
                for n in range(22)
            ]
            assert [c.status_code for c in codes] == [200] * 20 + [429] * 2
            assert codes[-1].headers["x-ratelimit-limit"].startswith("20, 20;w=86400")
            assert codes[0].json()["tenant"] == "globex"
            again = http.get("/search", headers={"x-tenant-id": "globex", "x-request-id": "s-3"})
            assert again.status_code == 200  # a retry of an admitted request: counted once
    finally:
        tool.terminate()
        tool.wait(10)
        if tool.stdout is not None:
            tool.stdout.close()
