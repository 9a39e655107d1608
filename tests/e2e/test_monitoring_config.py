"""The alert rules (deploy/prometheus/alerts.yml) and the Grafana dashboard
(deploy/grafana/billing-quota.json) name only metrics the processes really export, read
from a running sidecar's and control plane's /metrics and an executor's spool metrics; and
promtool accepts the rules."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from quota_client import QuotaClient
from quota_client.metrics import SpoolCollector

from quota_service.server import QuotaServer
from tests.conftest import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")
METRIC = re.compile(r"\b((?:quota|billing|control_plane)_[a-z_]+)\b")


def _exported(text: str) -> set[str]:
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return {f.removesuffix("_total") + s for f in families for s in SUFFIXES}


def _expressions() -> dict[str, list[str]]:
    config = yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())
    rules = [rule["expr"] for group in config["groups"] for rule in group["rules"]]
    dashboard: dict[str, Any] = json.loads((ROOT / "deploy/grafana/billing-quota.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {"alerts.yml": rules, "billing-quota.json": exprs}


def _executor_metrics(spool: Path) -> str:
    """What an executor exports of its client's spool (quota_client.metrics)."""
    registry = CollectorRegistry()
    with QuotaClient("127.0.0.1:9", spool_path=str(spool)) as client:
        registry.register(SpoolCollector(client.spool_status))
        return generate_latest(registry).decode()


async def test_every_metric_named_in_rules_and_dashboard_is_exported(
    sidecar: QuotaServer, control_plane: ControlPlane, tmp_path: Path
) -> None:
    async with httpx.AsyncClient() as http:
        plane = (await http.get(f"{control_plane.url}/metrics")).text
    exported = (
        _exported(generate_latest(sidecar.registry).decode())
        | _exported(plane)
        | _exported(_executor_metrics(tmp_path / "spool"))
    )
    named = {
        (where, name)
        for where, exprs in _expressions().items()
        for expr in exprs
        for name in METRIC.findall(expr)
    }
    assert len({n for _, n in named}) >= 10  # the files were read
    missing = sorted((w, n) for w, n in named if n not in exported)
    assert missing == [], missing


def test_promtool_accepts_the_alert_rules() -> None:
    """Prometheus's own check (Debian's prometheus package; `make test` installs it)."""
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: apt-get install prometheus"
    checked = subprocess.run(
        [promtool, "check", "rules", str(ROOT / "deploy/prometheus/alerts.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
