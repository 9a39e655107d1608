"""Generate the protobuf/gRPC stubs (with .pyi) from proto/ into generated/.

`python scripts/gen_proto.py` regenerates generated/ (make proto);
`python scripts/gen_proto.py --check` generates into a temporary directory and
fails when the committed generated/ differs from it (make check-generated).
"""

from __future__ import annotations

import filecmp
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"


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


def check() -> int:
    committed = ROOT / "generated"
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        want, have = _files(fresh), _files(committed)
        problems = [f"missing: generated/{name}" for name in sorted(want - have)]
        problems += [f"not generated from proto/: generated/{name}" for name in sorted(have - want)]
        problems += [
            f"differs from a fresh generation: generated/{name}"
            for name in sorted(want & have)
            if not filecmp.cmp(fresh / name, committed / name, shallow=False)
        ]
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        print("generated/ is stale: run `make proto` and commit the result", file=sys.stderr)
        return 1
    print("generated/ matches proto/")
    return 0


def main(argv: list[str]) -> int:
    if argv == ["--check"]:
        return check()
    if argv:
        print("usage: gen_proto.py [--check]", file=sys.stderr)
        return 2
    generate(ROOT / "generated")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
