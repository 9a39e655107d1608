"""Debian's PgBouncer in transaction mode in front of a database, for the bench's point
through a pooler and the tests that run the processes through one."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from psycopg.conninfo import conninfo_to_dict

from bench.measure import free_port
from billing_core.db.urls import libpq_url


@contextlib.contextmanager
def pgbouncer(database_url: str) -> Iterator[str]:
    """Debian's PgBouncer in transaction mode in front of the database of `database_url`;
    yields the URL through it. As root it runs as the user that owns the server's socket
    directory (or nobody, over TCP): PgBouncer will not run as root. Its files live in a
    directory of /tmp that user can reach."""
    info = conninfo_to_dict(libpq_url(database_url))
    host, dbname = str(info.get("host", "127.0.0.1")), str(info.get("dbname", "postgres"))
    port, user = str(info.get("port", 5432)), str(info.get("user", "postgres"))
    workdir = Path(tempfile.mkdtemp(prefix="bp-pgbouncer-"))
    workdir.chmod(0o777)
    listen = free_port()
    ini = workdir / "pgbouncer.ini"
    ini.write_text(
        f"[databases]\n{dbname} = host={host} port={port} dbname={dbname} user={user}\n"
        "[pgbouncer]\nlisten_addr = 127.0.0.1\n"
        f"listen_port = {listen}\nunix_socket_dir =\nauth_type = any\n"
        "pool_mode = transaction\nmax_client_conn = 500\ndefault_pool_size = 20\n"
        "ignore_startup_parameters = extra_float_digits\n"
        f"logfile = {workdir}/pgbouncer.log\npidfile = {workdir}/pgbouncer.pid\n"
    )
    ini.chmod(0o644)
    command = ["/usr/sbin/pgbouncer", str(ini)]
    if os.geteuid() == 0:
        owner = os.stat(host).st_uid if host.startswith("/") else pwd.getpwnam("nobody").pw_uid
        command += ["-u", pwd.getpwuid(owner).pw_name]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", listen)) == 0:
                    break
            log = workdir / "pgbouncer.log"
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"PgBouncer did not start:\n{log.read_text() if log.exists() else ''}"
                )
            time.sleep(0.05)
        yield f"postgresql://{user}@127.0.0.1:{listen}/{dbname}"
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
