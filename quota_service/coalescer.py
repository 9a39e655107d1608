"""Request coalescing for CheckAndConsume, Reserve, Commit and Release: concurrent requests
share one transaction.

Requests go to a lane chosen by tenant, so one tenant's requests are always decided in
arrival order by the same lane. A lane takes whatever has queued up while its previous
batch ran and decides the batch set-based in one transaction with one commit
(QuotaEngine.run_batch). A request that arrives at an idle lane whose previous batch
was a single request is decided at once, never held back for company; under load (the
previous batch had company) the lane first waits — at most `gather_s` — until as many
requests have queued as last time, so batches do not shrink just because the database
answered quickly, and until twice as many when as many as last time were already waiting
(a backlog: the load outgrows batches of that size, and each batch costs the event loop a
fixed share besides its requests; measured at 64 in flight: batches of 13 to 18 instead of
10, 0.54 to 0.59 ms of CPU per call instead of 0.64 to 0.80; at 2, 4 and 8 in flight no
slower). One lane is the default: a batch holds any mix of tenants, and on a
small machine the CPU, not the database, is the limit; more lanes (QUOTA_COALESCE_LANES)
overlap database round trips where there are cores to spare."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from billing_core.errors import QuotaError
from billing_core.quota_batch import Request
from billing_core.quota_engine import QuotaEngine
from billing_core.usage import (
    CommitRequest,
    CommitResult,
    ConsumeRequest,
    Decision,
    ReleaseRequest,
)

_Item = tuple[Request, "asyncio.Future[Decision | CommitResult | bool]"]


@dataclass
class _Lane:
    queue: asyncio.Queue[_Item] = field(default_factory=asyncio.Queue)
    last: int = 1  # size of the lane's previous batch
    want: int = 0  # while gathering: wake up once this many requests have queued
    wake: asyncio.Future[None] | None = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


@dataclass
class Coalescer:
    engine: QuotaEngine
    lanes: int = 8
    max_batch: int = 128
    gather_s: float = 0.002  # the longest a request waits for company (0: never)
    batches: int = 0  # for tests
    requests: int = 0
    on_batch: Callable[[int], None] | None = None  # told each batch's size (metrics)
    _lanes: list[_Lane] = field(default_factory=list)
    _workers: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._lanes = [_Lane() for _ in range(max(1, self.lanes))]
        self._workers = [asyncio.create_task(self._run(lane)) for lane in self._lanes]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def admit(self, req: ConsumeRequest) -> Decision:
        """Decide a CheckAndConsume, or a Reserve (a ReserveRequest), with its lane's batch."""
        result = await self._decide(req)
        assert isinstance(result, Decision)
        return result

    async def commit(self, req: CommitRequest) -> CommitResult:
        result = await self._decide(req)
        assert isinstance(result, CommitResult)
        return result

    async def release(self, req: ReleaseRequest) -> bool:
        result = await self._decide(req)
        assert isinstance(result, bool)
        return result

    async def _decide(self, req: Request) -> Decision | CommitResult | bool:
        if not self._lanes:
            return await self.engine.one(req)
        lane = self._lanes[zlib.crc32(req.tenant_id.encode()) % len(self._lanes)]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Decision | CommitResult | bool] = loop.create_future()
        lane.queue.put_nowait((req, future))
        if lane.wake is not None and lane.queue.qsize() >= lane.want:
            _resolve(lane.wake)
        return await future

    async def _gather(self, lane: _Lane, want: int) -> None:
        """Wait until `want` requests have queued, or `gather_s` has passed."""
        loop = asyncio.get_running_loop()
        lane.want = want
        lane.wake = woken = loop.create_future()
        timer = loop.call_later(self.gather_s, _resolve, woken)
        try:
            await woken
        finally:
            timer.cancel()
            lane.wake = None

    async def _run(self, lane: _Lane) -> None:
        queue = lane.queue
        while True:
            batch = [await queue.get()]
            # a backlog as big as the last batch: the load outgrows batches of that size
            grow = 2 if queue.qsize() + 1 >= lane.last > 1 else 1
            want = min(grow * lane.last, self.max_batch) - 1
            if self.gather_s > 0 and queue.qsize() < want:
                await self._gather(lane, want)
            while not queue.empty() and len(batch) < self.max_batch:
                batch.append(queue.get_nowait())
            lane.last = len(batch)
            live = [(req, fut) for req, fut in batch if not fut.cancelled()]
            if not live:
                continue
            self.batches += 1
            self.requests += len(live)
            if self.on_batch is not None:
                self.on_batch(len(live))
            try:
                results = await self.engine.run_batch([req for req, _ in live])
            except Exception as exc:  # never leave a caller waiting
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), result in zip(live, results, strict=True):
                if fut.done():
                    continue
                if isinstance(result, QuotaError):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)
