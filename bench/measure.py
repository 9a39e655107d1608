"""Running the servers and measuring one point: a server process (the sidecar or a
reference of bench.servers), the load process driving it (bench.load), and the CPU the
server, every PostgreSQL process and the load used meanwhile."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.report import FLOORS, RESERVE_COMMIT, Result

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Config:
    seconds: float
    warmup: float
    history_rows: int
    tenants: int
    in_flight: tuple[int, ...] = (1, 8, 64)
    rounds: int = 3
    page_rows: int = 1_000_000  # the overview point's tenant with a history
    page_renders: int = 40  # views of each overview per round
    # each sidecar's QUOTA_DB_POOL_SIZE (its default when None); the three sidecars on one
    # database hold a third of it each
    sidecar_pool: int | None = None


@dataclass
class Server:
    """One server process — or several alike (`more`: sidecars on one database), their
    targets comma-separated, their CPU summed."""

    name: str
    process: subprocess.Popen[str]
    target: str
    more: tuple[subprocess.Popen[str], ...] = ()

    @property
    def processes(self) -> tuple[subprocess.Popen[str], ...]:
        return (self.process, *self.more)

    def cpu_seconds(self) -> float:
        ticks = sum(_cpu_ticks(p.pid)[1] for p in self.processes)
        return ticks / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        peak = 0.0
        for p in self.processes:
            for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
        return peak

    def running(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()


def _cpu_ticks(pid: int) -> tuple[str, int]:
    """A process's name and the CPU ticks (user + system) it has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    name, rest = stat[stat.index("(") + 1 :].rsplit(")", 1)
    fields = rest.split()
    return name, int(fields[11]) + int(fields[12])


def postgres_cpu_ticks() -> dict[int, int]:
    """CPU ticks used so far by each PostgreSQL process on this machine (backends, WAL
    writer, checkpointer; the bench's database is the only busy one)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name, ticks = _cpu_ticks(int(pid))
        except OSError:  # gone meanwhile
            continue
        if name.startswith("postgres"):
            found[int(pid)] = ticks
    return found


def postgres_cpu_since(before: dict[int, int]) -> float:
    """Seconds of CPU the PostgreSQL processes used since `before`, process by process (one
    that exited meanwhile takes its CPU along: a slight undercount, never a negative)."""
    now = postgres_cpu_ticks()
    ticks = sum(t - before.get(pid, 0) for pid, t in now.items())
    return ticks / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _wait_serving(target: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                time.sleep(0.1)
    raise RuntimeError(f"{target} did not become SERVING")


def start_sidecar(
    database_url: str,
    coalesce: bool,
    *,
    name: str = "",
    count: int = 1,
    env: dict[str, str] | None = None,
) -> Server:
    """`count` sidecar processes on the database (`env`: more settings)."""
    procs, targets = [], []
    for _ in range(count):
        port = free_port()
        settings = {
            **os.environ,
            "DATABASE_URL": database_url,
            "QUOTA_GRPC_PORT": str(port),
            "QUOTA_METRICS_PORT": "-1",
            "QUOTA_COALESCE": "on" if coalesce else "off",
            "LOG_LEVEL": "warning",
            "LOG_FORMAT": "json",
            **(env or {}),
        }
        command = [sys.executable, "-m", "quota_service"]
        procs.append(subprocess.Popen(command, env=settings, cwd=ROOT, text=True))
        targets.append(f"127.0.0.1:{port}")
    for target in targets:
        _wait_serving(target)
    name = name or ("sidecar" if coalesce else "sidecar (no coalescing)")
    return Server(name, procs[0], ",".join(targets), tuple(procs[1:]))


# the references by name in the tables: their kind in bench.servers
REFERENCES = {
    "echo": "echo",
    "textbook": "textbook",
    FLOORS[0]: "floor1",
    FLOORS[1]: "floor2",
}


def start_reference(name: str, database_url: str) -> Server:
    kind = REFERENCES[name]
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.servers", kind, "--database-url", database_url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return Server(name, proc, f"127.0.0.1:{port}")


def drive(server: Server, scenario: str, in_flight: int, cfg: Config) -> Result:
    tenants = {"hot": "hot", "10k-uniform": "uniform", "zipf": "zipf", "history": "hot",
               RESERVE_COMMIT: "hot"}  # fmt: skip
    resource = "tokens" if tenants[scenario] == "hot" else "messages"
    calls = "reserve-commit" if scenario == RESERVE_COMMIT else "check-and-consume"
    cpu0, db0, load0 = server.cpu_seconds(), postgres_cpu_ticks(), _children_cpu_seconds()
    out = subprocess.run(
        [sys.executable, "-m", "bench.load", "--target", server.target,
         "--in-flight", str(in_flight), "--seconds", str(cfg.seconds),
         "--warmup", str(cfg.warmup), "--tenants", tenants[scenario],
         "--tenant-count", str(cfg.tenants), "--resource", resource, "--calls", calls],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    cpu = server.cpu_seconds() - cpu0
    db, load = postgres_cpu_since(db0), _children_cpu_seconds() - load0
    data = json.loads(out.stdout)
    total_calls = max(1, data["calls"]) * (cfg.seconds + cfg.warmup) / cfg.seconds
    return Result(
        server.name,
        scenario,
        in_flight,
        data["calls_per_s"],
        data["p50_ms"],
        data["p99_ms"],
        data["p999_ms"],
        cpu * 1000 / total_calls,
        server.peak_rss_mb(),
        data["errors"],
        db_cpu_ms_per_call=db * 1000 / total_calls,
        load_cpu_ms_per_call=load * 1000 / total_calls,
    )
