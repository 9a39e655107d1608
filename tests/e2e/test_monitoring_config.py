"""The alert rules (deploy/prometheus/alerts.yml) and the Grafana dashboard
(deploy/grafana/billing-quota.json) name only metrics the two processes really export,
read from a running sidecar's and control plane's /metrics."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
from prometheus_client import generate_latest

from quota_service.server import QuotaServer
from tests.conftest import ControlPlane

ROOT = Path(__file__).resolve().parents[2]
SUFFIXES = ("", "_total", "_bucket", "_count", "_sum", "_created")
METRIC = re.compile(r"\b((?:quota|billing|control_plane)_[a-z_]+)\b")


def _exported(text: str) -> set[str]:
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return {f.removesuffix("_total") + s for f in families for s in SUFFIXES}


def _expressions() -> dict[str, list[str]]:
    rules = (ROOT / "deploy/prometheus/alerts.yml").read_text()
    dashboard: dict[str, Any] = json.loads((ROOT / "deploy/grafana/billing-quota.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    return {"alerts.yml": [rules], "billing-quota.json": exprs}


async def test_every_metric_named_in_rules_and_dashboard_is_exported(
    sidecar: QuotaServer, control_plane: ControlPlane
) -> None:
    async with httpx.AsyncClient() as http:
        plane = (await http.get(f"{control_plane.url}/metrics")).text
    exported = _exported(generate_latest(sidecar.registry).decode()) | _exported(plane)
    named = {
        (where, name)
        for where, exprs in _expressions().items()
        for expr in exprs
        for name in METRIC.findall(expr)
    }
    assert len({n for _, n in named}) >= 10  # the files were read
    missing = sorted((w, n) for w, n in named if n not in exported)
    assert missing == [], missing
