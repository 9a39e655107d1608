"""The durable spool of usage allowed open: what a client let through while the sidecar
could not be reached, kept on local disk until ReportUsage has counted it.

`path` holds one JSON line per allowed call, appended and fsync'd before the call
returns; `path + ".done"` holds the request_ids reported since (fsync'd too). A line is
pending while its request_id is not done. Once nothing is pending both files are emptied.
Processes may share a spool: an exclusive file lock guards appends, marks and emptying.
A line that cannot be read (a torn write, a stray edit) is logged, counted and skipped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from quota.v1 import quota_service_pb2 as pb

log = logging.getLogger("quota_client.spool")


@dataclass(frozen=True, slots=True)
class SpooledUsage:
    tenant_id: str
    resource: str
    amount: int
    request_id: str
    occurred_at: datetime
    tokens: tuple[str, str, int, int] | None = None
    labels: Mapping[str, str] = field(default_factory=dict)

    def to_line(self) -> bytes:
        return (
            json.dumps(
                {
                    "tenant_id": self.tenant_id,
                    "resource": self.resource,
                    "amount": self.amount,
                    "request_id": self.request_id,
                    "occurred_at": self.occurred_at.isoformat(),
                    "tokens": list(self.tokens) if self.tokens else None,
                    "labels": dict(self.labels),
                },
                separators=(",", ":"),
            ).encode()
            + b"\n"
        )

    @classmethod
    def from_line(cls, line: bytes) -> SpooledUsage:
        data = json.loads(line)
        tokens = data.get("tokens")
        at = datetime.fromisoformat(data["occurred_at"])
        if at.tzinfo is None:
            raise ValueError("occurred_at without a timezone")
        return cls(
            tenant_id=str(data["tenant_id"]),
            resource=str(data["resource"]),
            amount=int(data["amount"]),
            request_id=str(data["request_id"]),
            occurred_at=at,
            tokens=(str(tokens[0]), str(tokens[1]), int(tokens[2]), int(tokens[3]))
            if tokens
            else None,
            labels={str(k): str(v) for k, v in (data.get("labels") or {}).items()},
        )

    @classmethod
    def of(
        cls, request: pb.CheckAndConsumeRequest | pb.ReserveRequest, amount: int | None = None
    ) -> SpooledUsage:
        """What a CheckAndConsume (or the Commit of a Reserve) allowed open used, now."""
        t = request.tokens if request.HasField("tokens") else None
        return cls(
            tenant_id=request.tenant_id,
            resource=request.resource,
            amount=request.amount if amount is None else amount,
            request_id=request.request_id,
            occurred_at=datetime.now(UTC),
            tokens=(t.provider, t.model, t.input_tokens, t.output_tokens) if t else None,
            labels=dict(request.labels),
        )

    def report_request(self) -> pb.ReportUsageRequest:
        at = Timestamp()
        at.FromDatetime(self.occurred_at)
        request = pb.ReportUsageRequest(
            tenant_id=self.tenant_id,
            resource=self.resource,
            amount=self.amount,
            request_id=self.request_id,
            labels=dict(self.labels),
            occurred_at=at,
        )
        if self.tokens:
            request.tokens.CopyFrom(
                pb.TokenUsage(
                    provider=self.tokens[0],
                    model=self.tokens[1],
                    input_tokens=self.tokens[2],
                    output_tokens=self.tokens[3],
                )
            )
        return request


@dataclass(slots=True)
class SpoolStatus:
    pending: int
    oldest_pending: datetime | None
    reported: int  # counted by the sidecar (or found counted already) by this client
    rejected: int  # refused for good by the sidecar (logged): never counted
    unreadable: int  # lines skipped because they could not be read

    def stuck_for(self, now: datetime | None = None) -> float:
        """Seconds the oldest pending usage has waited (0 when none waits)."""
        if self.oldest_pending is None:
            return 0.0
        return ((now or datetime.now(UTC)) - self.oldest_pending).total_seconds()


class Spool:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.done_path = self.path.with_name(self.path.name + ".done")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._guard = threading.Lock()  # threads of this process; the file lock: processes
        self.reported = 0
        self.rejected = 0
        self._unreadable_seen: set[int] = set()  # offsets already reported as unreadable

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with self._guard, open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def append(self, usage: SpooledUsage) -> None:
        """Keep `usage` durably (on disk, fsync'd) before the caller goes on."""
        with self._locked():
            created = not self.path.exists()
            with open(self.path, "ab") as f:
                if f.tell() and not self._ends_with_newline():
                    f.write(b"\n")  # a torn last line stays alone, not glued to this one
                f.write(usage.to_line())
                f.flush()
                os.fsync(f.fileno())
            if created:
                _fsync_dir(self.path.parent)

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def pending(self) -> list[SpooledUsage]:
        """The usage not reported yet, in the order it was spooled (one per request_id)."""
        with self._locked():
            return self._pending()

    def _pending(self) -> list[SpooledUsage]:
        done = self._done()
        found: dict[str, SpooledUsage] = {}
        for offset, line in self._lines():
            try:
                usage = SpooledUsage.from_line(line)
            except (ValueError, KeyError, TypeError, IndexError) as exc:
                if offset not in self._unreadable_seen:
                    self._unreadable_seen.add(offset)
                    log.error("spool line at byte %d of %s skipped: %s", offset, self.path, exc)
                continue
            if usage.request_id not in done:
                found.setdefault(usage.request_id, usage)
        return list(found.values())

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        if not self.path.exists():
            return
        offset = 0
        with open(self.path, "rb") as f:
            for line in f:
                if line.strip():
                    yield offset, line
                offset += len(line)

    def _done(self) -> set[str]:
        if not self.done_path.exists():
            return set()
        return {line.strip() for line in self.done_path.read_text().splitlines() if line.strip()}

    def mark_done(self, request_id: str, *, rejected: bool = False) -> None:
        """The sidecar has counted it (or refused it for good): never report it again."""
        with self._locked():
            with open(self.done_path, "a") as f:
                f.write(request_id + "\n")
                f.flush()
                os.fsync(f.fileno())
            if rejected:
                self.rejected += 1
            else:
                self.reported += 1

    def empty_if_done(self) -> bool:
        """Empty both files when nothing is pending (True then)."""
        with self._locked():
            if self._pending():
                return False
            for path in (self.path, self.done_path):
                if path.exists() and path.stat().st_size:
                    with open(path, "r+b") as f:
                        f.truncate(0)
                        os.fsync(f.fileno())
            self._unreadable_seen.clear()
            return True

    def status(self) -> SpoolStatus:
        pending = self.pending()
        return SpoolStatus(
            pending=len(pending),
            oldest_pending=min((u.occurred_at for u in pending), default=None),
            reported=self.reported,
            rejected=self.rejected,
            unreadable=len(self._unreadable_seen),
        )


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# what a ReportUsage answer means for the spooled line
def verdict_of(code: Any) -> str:
    """'done' (counted, or counted before), 'rejected' (refused for good: retrying cannot
    help) or 'retry' (the sidecar cannot be reached or is busy)."""
    import grpc

    if code is None:
        return "done"
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
    ):
        return "rejected"
    return "retry"


class Drainer:
    """Reports a spool's pending usage with ReportUsage, oldest first, on a thread of its
    own (sync clients) or when asked (`once`). The sidecar's request_id check makes a
    report that is sent twice (a crash between its answer and its mark) count once."""

    def __init__(
        self,
        spool: Spool,
        report: Any,  # the blocking ReportUsage call: (request, timeout=…) -> response
        *,
        interval: float = 1.0,
        max_backoff: float = 30.0,
    ) -> None:
        self.spool = spool
        self._report = report
        self.interval = interval
        self.max_backoff = max_backoff
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="quota-spool-drain", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        delay = self.interval
        while not self._stopping:
            self._wake.wait(delay)
            self._wake.clear()
            if self._stopping:
                return
            try:
                left = self.once()
            except Exception:  # a drain must outlive anything: try again later
                log.exception("spool drain failed")
                left = -1
            delay = self.interval if left == 0 else min(self.max_backoff, max(delay * 2, 0.5))

    def once(self, timeout: float = 2.0) -> int:
        """Report what is pending; the number still pending (the sidecar unreachable)."""
        import grpc

        pending = self.spool.pending()
        for i, usage in enumerate(pending):
            code = None
            try:
                self._report(usage.report_request(), timeout=timeout)
            except grpc.RpcError as exc:
                code = exc.code() if isinstance(exc, grpc.Call) else grpc.StatusCode.UNKNOWN
            verdict = verdict_of(code)
            if verdict == "retry":
                return len(pending) - i
            if verdict == "rejected":
                log.error(
                    "spooled usage %s refused for good (%s): not counted", usage.request_id, code
                )
            self.spool.mark_done(usage.request_id, rejected=verdict == "rejected")
        self.spool.empty_if_done()
        return 0
