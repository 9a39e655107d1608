"""Request coalescing: concurrent CheckAndConsume, Reserve, Commit, Release and Free calls
share one transaction (QuotaEngine.run_batch), each tenant's in arrival order; a batch that
waits on a lock held elsewhere does not hold up the other tenants."""

from __future__ import annotations

import asyncio
import contextlib
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog

from billing_core.errors import QuotaError
from billing_core.quota.answers import CommitResult, Decision, FreeResult, GroupDecision, Result
from billing_core.quota.engine import QuotaEngine
from billing_core.quota.requests import (
    AdmitAllRequest,
    CommitRequest,
    ConsumeRequest,
    FreeRequest,
    ReleaseRequest,
    Request,
)

log = structlog.get_logger(__name__)
_Item = tuple[Request, "asyncio.Future[Result]"]
# the most batches of one lane at once: its own, and those that went on without stalled ones
MAX_RUNNING = 4


@dataclass
class _Lane:
    pending: deque[_Item] = field(default_factory=deque)  # in arrival order, in no batch yet
    busy: set[str] = field(default_factory=set)  # tenants of the lane's running batches
    running: set[asyncio.Task[None]] = field(default_factory=set)
    last: int = 1  # size of the lane's previous batch
    want: int = 0  # while waiting: wake up once this many requests are pending
    wake: asyncio.Future[None] | None = None  # also woken when a running batch finishes


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


@dataclass
class Coalescer:
    """Requests go to a lane chosen by tenant. A lane takes whatever queued while its
    previous batch ran; a request at an idle lane whose previous batch was a single request
    is decided at once. Under load the lane waits, at most `gather_s`, until as many
    requests as last time have queued (twice as many when a backlog that size was already
    waiting), so batches do not shrink because the database answered quickly.
    A batch running longer than `stall_s` (a row lock held elsewhere) does not hold up its
    lane: the lane goes on beside it, on the shared pool, without the stalled batch's
    tenants, whose requests wait to keep their order; tenants the stalled batch answers
    early (one request per transaction after its lock timeout) are released at once."""

    engine: QuotaEngine
    lanes: int = 8
    max_batch: int = 128
    gather_s: float = 0.002  # the longest a request waits for company (0: never)
    # how long a batch may run before the lane goes on without it: its tenants' requests
    # wait for it (their order), everyone else's go into the next batch (0: never)
    stall_s: float = 0.1
    batches: int = 0  # for tests
    requests: int = 0
    overtaken: int = 0  # batches the lane went on without, having run longer than stall_s
    on_batch: Callable[[int], None] | None = None  # told each batch's size (metrics)
    _lanes: list[_Lane] = field(default_factory=list)
    _workers: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._lanes = [_Lane() for _ in range(max(1, self.lanes))]
        self._workers = [asyncio.create_task(self._run(lane)) for lane in self._lanes]

    async def stop(self) -> None:
        tasks = [*self._workers, *(t for lane in self._lanes for t in lane.running)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def admit(self, req: ConsumeRequest) -> Decision:
        """Decide a CheckAndConsume, or a Reserve (a ReserveRequest), with its lane's batch."""
        result = await self._decide(req)
        assert isinstance(result, Decision)
        return result

    async def admit_all(self, req: AdmitAllRequest) -> GroupDecision:
        """Decide several CheckAndConsumes of one tenant all-or-nothing, with the batch."""
        result = await self._decide(req)
        assert isinstance(result, GroupDecision)
        return result

    async def commit(self, req: CommitRequest) -> CommitResult:
        result = await self._decide(req)
        assert isinstance(result, CommitResult)
        return result

    async def release(self, req: ReleaseRequest) -> bool:
        result = await self._decide(req)
        assert isinstance(result, bool)
        return result

    async def free(self, req: FreeRequest) -> FreeResult:
        result = await self._decide(req)
        assert isinstance(result, FreeResult)
        return result

    async def _decide(self, req: Request) -> Result:
        if not self._lanes:
            result = await self.engine.decide(req)
            if isinstance(result, QuotaError):
                raise result
            return result
        lane = self._lanes[zlib.crc32(req.tenant_id.encode()) % len(self._lanes)]
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        lane.pending.append((req, future))
        if len(lane.pending) >= lane.want:
            _resolve(lane.wake)
        return await future

    async def _wait(self, lane: _Lane, want: int, timeout_s: float | None) -> None:
        """Until `want` requests are pending, a running batch finishes, or `timeout_s`."""
        loop = asyncio.get_running_loop()
        lane.want = want
        lane.wake = woken = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, _resolve, woken)
        try:
            await woken
        finally:
            if timer is not None:
                timer.cancel()
            lane.wake = None
            lane.want = 0

    async def _run(self, lane: _Lane) -> None:
        while True:
            if not lane.pending:
                await self._wait(lane, 1, None)
            if all(req.tenant_id in lane.busy for req, _ in lane.pending):
                # every pending request waits for its tenant's running batch
                await self._wait(lane, len(lane.pending) + 1, None)
                continue
            pending = len(lane.pending)
            # a backlog as big as the last batch: the load outgrows batches of that size
            grow = 2 if pending >= lane.last > 1 else 1
            want = min(grow * lane.last, self.max_batch)
            if self.gather_s > 0 and pending < want:
                await self._wait(lane, want, self.gather_s)
            batch = self._take(lane)
            if not batch:
                continue
            lane.last = len(batch)
            self.batches += 1
            self.requests += len(batch)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            released_early: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            execute = self._execute(lane, batch, released_early, shared=bool(lane.running))
            task = asyncio.create_task(execute)
            lane.running.add(task)
            # the next batch forms once this one is done: from what queued up meanwhile —
            # or, when this one stalls (a lock held elsewhere) or lets some of its tenants
            # go early (decided one by one after its lock timeout), without its other tenants
            done, _ = await asyncio.wait(
                {task, released_early} if self.stall_s else {task},
                timeout=self.stall_s or None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not done:
                self.overtaken += 1
                log.warning(
                    "batch_stalled",
                    requests=len(batch),
                    tenants=len({req.tenant_id for req, _ in batch}),
                    after_ms=round(self.stall_s * 1000),
                )
            while len(lane.running) >= MAX_RUNNING:
                await asyncio.wait(lane.running, return_when=asyncio.FIRST_COMPLETED)

    def _take(self, lane: _Lane) -> list[_Item]:
        """The next batch: up to max_batch pending requests in arrival order, none of a
        tenant in a running batch (those stay pending, in order); their tenants are busy
        from now on."""
        batch: list[_Item] = []
        left: deque[_Item] = deque()
        for item in lane.pending:
            req, future = item
            if future.cancelled():  # its caller gave up
                continue
            if len(batch) < self.max_batch and req.tenant_id not in lane.busy:
                batch.append(item)
            else:
                left.append(item)
        lane.pending = left
        lane.busy.update(req.tenant_id for req, _ in batch)
        return batch

    async def _execute(
        self,
        lane: _Lane,
        batch: list[_Item],
        released_early: asyncio.Future[None],
        *,
        shared: bool,
    ) -> None:
        # requests not answered yet, by tenant: a tenant all of whose requests are answered
        # (a batch decided one by one after a lock timeout answers them as it goes) is no
        # longer busy, so its next requests need not wait for a tenant locked elsewhere
        left = Counter(req.tenant_id for req, _ in batch)

        def answer(i: int, result: Result) -> None:
            req, fut = batch[i]
            _settle(fut, result)
            left[req.tenant_id] -= 1
            if not left[req.tenant_id]:
                del left[req.tenant_id]
                lane.busy.discard(req.tenant_id)
                _resolve(lane.wake)
                _resolve(released_early)

        try:
            results = await self.engine.run_batch(
                [req for req, _ in batch], shared=shared, answer=answer
            )
        except Exception as exc:  # never leave a caller waiting
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
        else:
            for (_, fut), result in zip(batch, results, strict=True):
                _settle(fut, result)
        finally:
            lane.busy.difference_update(left)  # those not let go by answer()
            lane.running.discard(asyncio.current_task())
            _resolve(lane.wake)


def _settle(future: asyncio.Future[Result], result: Result) -> None:
    """Answer a caller, unless it was answered already or gave up."""
    if future.done():
        return
    if isinstance(result, QuotaError):
        future.set_exception(result)
    else:
        future.set_result(result)
