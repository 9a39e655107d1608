"""schemathesis against the live control plane: no 500, every response matches the schema."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import ControlPlane, running_control_plane

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"


@pytest.mark.slow
async def test_schemathesis_finds_no_server_error_and_no_schema_mismatch(
    scratch_database: str, tmp_path: Path
) -> None:
    # its own database: the random plans it creates must not meet other tests
    async with running_control_plane(scratch_database) as control_plane:
        await _run_schemathesis(control_plane, tmp_path)


async def _run_schemathesis(control_plane: ControlPlane, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        str(SCHEMATHESIS),
        "run",
        f"{control_plane.url}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance,negative_data_rejection",
        "-H",
        f"Authorization: Bearer {control_plane.key}",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--workers",
        "2",
        "--phases",
        "examples,coverage,fuzzing",
        "--generation-database",
        ":memory:",
        "--no-color",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""},
    )
    out, _ = await proc.communicate()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-8000:]
