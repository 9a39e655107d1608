"""Dependencies point inwards: billing_core knows no transport and no Stripe."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {
    "billing_core": {
        "grpc",
        "grpc_health",
        "grpc_reflection",
        "starlette",
        "uvicorn",
        "stripe",
        "quota",
        "quota_service",
        "control_plane",
        "stripe_emulator",
    },
    "quota_service": {"starlette", "stripe", "control_plane", "stripe_emulator"},
    "control_plane": {"grpc", "quota_service", "stripe_emulator"},
    # the emulator plays Stripe: it shares nothing with the product but settings and logs
    "stripe_emulator": {"stripe", "grpc", "quota_service", "control_plane", "psycopg"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_may(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imports(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
        if _imports(path) & FORBIDDEN[package]
    }
    assert offenders == {}


def test_every_domain_error_has_a_grpc_status() -> None:
    from billing_core.errors import ALL_ERRORS, QuotaError
    from quota_service.errors import STATUS_FOR

    def subclasses(cls: type[QuotaError]) -> set[type[QuotaError]]:
        found = set(cls.__subclasses__())
        for sub in list(found):
            found |= subclasses(sub)
        return found

    assert subclasses(QuotaError) == set(ALL_ERRORS)
    assert set(STATUS_FOR) == set(ALL_ERRORS)


def test_every_domain_error_has_one_http_problem() -> None:
    from billing_core.errors import ALL_ERRORS
    from control_plane.api.problems import STATUS_FOR as HTTP_FOR

    assert set(HTTP_FOR) == set(ALL_ERRORS)
    for cls in ALL_ERRORS:
        status, slug, title = HTTP_FOR[cls]
        assert 400 <= status < 600 and slug and title
