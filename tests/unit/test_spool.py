"""The client's spool of usage allowed open: durable lines, one report per request_id,
unreadable lines skipped (and said), shared by threads."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from quota_client._spool import Spool, SpooledUsage

AT = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


def usage(n: int, **more: object) -> SpooledUsage:
    return SpooledUsage("acme", "messages", n, f"r{n}", AT, **more)  # type: ignore[arg-type]


def test_pending_until_marked_then_emptied(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    for n in (1, 2, 3):
        spool.append(usage(n, tokens=("openai", "gpt-4o", 10, 5), labels={"job": "x"}))
    spool.append(usage(2))  # the same request_id again: one report
    assert [u.request_id for u in spool.pending()] == ["r1", "r2", "r3"]
    assert spool.pending()[0].tokens == ("openai", "gpt-4o", 10, 5)
    spool.mark_done("r1")
    spool.mark_done("r3", rejected=True)
    assert [u.request_id for u in Spool(spool.path).pending()] == ["r2"]  # as another process
    assert not spool.empty_if_done()
    spool.mark_done("r2")
    assert spool.empty_if_done()
    assert spool.path.read_bytes() == b"" and spool.done_path.read_bytes() == b""
    status = spool.status()
    assert (status.pending, status.reported, status.rejected) == (0, 2, 1)


def test_a_torn_line_is_skipped_said_and_never_glued_to_the_next(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = Spool(tmp_path / "spool.jsonl")
    spool.append(usage(1))
    with open(spool.path, "ab") as f:
        f.write(b'{"tenant_id": "acme", "resource": "mes')  # a crash mid-write
    spool.append(usage(2))
    with open(spool.path, "ab") as f:
        f.write(b"not json at all\n")
        f.write(
            b'{"tenant_id": "acme", "resource": "m", "amount": 1, "request_id": "x",'
            b' "occurred_at": "2026-12-07T12:00:00"}\n'
        )  # no timezone: unreadable
    with caplog.at_level(logging.ERROR, logger="quota_client.spool"):
        assert [u.request_id for u in spool.pending()] == ["r1", "r2"]
        spool.pending()  # said once per line, not at every look
    assert len([r for r in caplog.records if "skipped" in r.message]) == 3
    assert spool.status().unreadable == 3
    assert spool.status().stuck_for(datetime(2026, 12, 7, 12, 1, tzinfo=UTC)) == 60


def test_threads_appending_at_once_lose_nothing(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.jsonl")

    def write(base: int) -> None:
        for n in range(50):
            spool.append(usage(base + n))

    threads = [threading.Thread(target=write, args=(1000 * i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(spool.pending()) == 400
    assert all(line.endswith(b"}\n") for line in spool.path.read_bytes().splitlines(True))


def test_a_report_request_carries_the_moment_and_the_tokens() -> None:
    request = usage(7, tokens=("p", "m", 3, 4), labels={"k": "v"}).report_request()
    assert request.occurred_at.ToDatetime(tzinfo=UTC) == AT
    assert (request.tokens.provider, request.tokens.output_tokens) == ("p", 4)
    assert dict(request.labels) == {"k": "v"} and request.request_id == "r7"
