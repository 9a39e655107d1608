"""schemathesis against the live control plane, every phase (examples, coverage, fuzzing,
and stateful runs along the OpenAPI links from created plans, tenants and keys) with every
check on (`--checks all`), and our own check (schemathesis_hooks.py): data the schema
admits never fails the request validator. schemathesis.toml says which answers schema-valid
data may get."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tests.billing.conftest import billing_stack
from tests.reliability import harness

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
HERE = Path(__file__).resolve().parent


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    scratch_database: str, tmp_path: Path
) -> None:
    # its own database (the random plans it creates must not meet other tests) and its own
    # local Stripe: the stateful runs reach checkout, the portal and plan changes
    async with billing_stack(scratch_database, auth_failures_per_minute=0) as stack:
        await _run_schemathesis(stack.url, stack.key, tmp_path)


async def _run_schemathesis(url: str, key: str, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "-H",
        f"Authorization: Bearer {key}",
        "--max-examples",
        str(25 * min(harness.scale(), 4)),
        "--seed",
        "1",
        "--workers",
        "2",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--generation-database",
        ":memory:",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.api.schemathesis_hooks",
            "PYTHONPATH": str(HERE.parents[1]),
        },
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-8000:]
    cases = re.search(r"(\d+) generated, (\d+) passed", text)
    assert cases is not None, text[-2000:]
    harness.report(
        "schemathesis over the HTTP API: every phase, --checks all",
        bad_inputs=int(cases[1]),
        lost=0,
        counted_twice=0,
        applied_twice=0,
        notes=f"{cases[1]} generated cases (schema-valid and not, stateful along the links), "
        "every answer as documented",
    )
