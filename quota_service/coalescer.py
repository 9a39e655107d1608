"""Request coalescing for CheckAndConsume: concurrent requests share one transaction.

Requests go to a lane chosen by tenant, so one tenant's requests are always decided in
arrival order by the same lane. A lane takes whatever has queued up while its previous
batch ran — a request that arrives to an idle lane is decided at once, never held back
for company — and decides the batch set-based in one transaction with one commit
(QuotaEngine.consume_batch). One lane is the default: a batch holds any mix of tenants, and
on a small machine the CPU, not the database, is the limit; more lanes
(QUOTA_COALESCE_LANES) overlap database round trips where there are cores to spare."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from dataclasses import dataclass, field

from billing_core.errors import QuotaError
from billing_core.quota_engine import QuotaEngine
from billing_core.usage import ConsumeRequest, Decision

_Item = tuple[ConsumeRequest, "asyncio.Future[Decision]"]


@dataclass
class Coalescer:
    engine: QuotaEngine
    lanes: int = 8
    max_batch: int = 128
    batches: int = 0  # for metrics and tests
    requests: int = 0
    _queues: list[asyncio.Queue[_Item]] = field(default_factory=list)
    _workers: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._queues = [asyncio.Queue() for _ in range(max(1, self.lanes))]
        self._workers = [asyncio.create_task(self._lane(q)) for q in self._queues]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        for worker in self._workers:
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    async def consume(self, req: ConsumeRequest) -> Decision:
        if not self._queues:
            return await self.engine.consume(req)
        lane = zlib.crc32(req.tenant_id.encode()) % len(self._queues)
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._queues[lane].put_nowait((req, future))
        return await future

    async def _lane(self, queue: asyncio.Queue[_Item]) -> None:
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < self.max_batch:
                batch.append(queue.get_nowait())
            live = [(req, fut) for req, fut in batch if not fut.cancelled()]
            if not live:
                continue
            self.batches += 1
            self.requests += len(live)
            try:
                results = await self.engine.consume_batch([req for req, _ in live])
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
