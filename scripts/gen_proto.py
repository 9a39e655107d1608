"""Generate the protobuf/gRPC stubs (with .pyi) from proto/ into the client distribution,
clients/python/src/quota: the one copy, which the sidecar imports through its dependency on
the client and which the client ships on its own.

`python scripts/gen_proto.py` regenerates them (make proto);
`python scripts/gen_proto.py --check` generates into a temporary directory and fails when
the committed stubs differ from it (make check-generated).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
# where the committed stubs live (a package `quota` beside the client's `quota_client`)
TARGETS = (ROOT / "clients" / "python" / "src",)


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    env = dict(os.environ)
    # protoc finds the mypy-protobuf plugins on PATH; they live beside this interpreter.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{PROTO_DIR}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--mypy_out={out_dir}",
            f"--mypy_grpc_out={out_dir}",
            *protos,
        ],
        check=True,
        env=env,
    )
    for package_dir in {p.parent for p in out_dir.rglob("*_pb2.py")}:
        current = package_dir
        while current != out_dir:
            (current / "__init__.py").touch()
            (current / "py.typed").touch()
            current = current.parent


def _files(base: Path) -> set[str]:
    return {
        str(p.relative_to(base))
        for p in base.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def _drift(fresh: Path, committed: Path) -> list[str]:
    where = committed.relative_to(ROOT)
    want, have = _files(fresh), _files(committed)
    problems = [f"missing: {where}/{name}" for name in sorted(want - have)]
    problems += [f"not generated from proto/: {where}/{name}" for name in sorted(have - want)]
    problems += [
        f"differs from a fresh generation: {where}/{name}"
        for name in sorted(want & have)
        if not filecmp.cmp(fresh / name, committed / name, shallow=False)
    ]
    return problems


def write_all() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        for target in TARGETS:
            for top in fresh.iterdir():
                shutil.rmtree(target / top.name, ignore_errors=True)
                shutil.copytree(top, target / top.name)


def check() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        problems: list[str] = []
        for target in TARGETS:
            for top in fresh.iterdir():
                problems += _drift(top, target / top.name)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("generated stubs are stale: run `make proto` and commit the result", file=sys.stderr)
        return 1
    print("the stubs in clients/python/src/quota match proto/")
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        return check()
    if argv:
        print("usage: gen_proto.py [--check]", file=sys.stderr)
        return 2
    write_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
