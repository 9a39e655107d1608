"""How the coalescer forms batches: alone when idle, gathered (boundedly) under load."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_core.errors import QuotaError
from billing_core.quota.answers import Decision, Result
from billing_core.quota.engine import QuotaEngine
from billing_core.quota.requests import ConsumeRequest
from billing_core.rules.limits import Reason
from quota_service.coalescer import Coalescer


class _Recorder:
    """Stands in for the engine: records each batch's request_ids and allows all."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    async def run_batch(
        self,
        reqs: Sequence[ConsumeRequest],
        *,
        shared: bool = False,
        answer: Callable[[int, Result], None] | None = None,
    ) -> list[Decision | QuotaError]:
        self.batches.append([r.request_id for r in reqs])
        await asyncio.sleep(0)  # a database round trip, in spirit
        return [Decision(True, Reason.ALLOWED, ()) for _ in reqs]


def _req(request_id: str) -> ConsumeRequest:
    return ConsumeRequest("t", "messages", 1, request_id)


async def _started(gather_s: float) -> tuple[Coalescer, _Recorder]:
    recorder = _Recorder()
    coalescer = Coalescer(cast(QuotaEngine, recorder), lanes=1, gather_s=gather_s)
    coalescer.start()
    return coalescer, recorder


async def test_a_request_at_an_idle_lane_is_decided_alone_and_at_once() -> None:
    coalescer, recorder = await _started(gather_s=3600)  # a wait would outlast the test
    try:
        for request_id in ("a", "b"):
            # the safety net only: a lone request must never wait for the hour-long bound
            assert (await asyncio.wait_for(coalescer.admit(_req(request_id)), 60)).allowed
    finally:
        await coalescer.stop()
    assert recorder.batches == [["a"], ["b"]]


async def test_under_load_a_batch_waits_for_as_many_requests_as_last_time() -> None:
    coalescer, recorder = await _started(gather_s=3600)  # woken by the count, not the bound
    try:
        await asyncio.gather(*(coalescer.admit(_req(f"first-{i}")) for i in range(3)))
        # one request now, two more a few loop turns later: one batch of three
        lone = asyncio.ensure_future(coalescer.admit(_req("x")))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not lone.done()  # waiting for company
        rest = [asyncio.ensure_future(coalescer.admit(_req(f"y{i}"))) for i in range(2)]
        await asyncio.wait_for(asyncio.gather(lone, *rest), 60)  # safety net only
    finally:
        await coalescer.stop()
    assert recorder.batches == [["first-0", "first-1", "first-2"], ["x", "y0", "y1"]]


async def test_the_wait_for_company_is_bounded() -> None:
    coalescer, recorder = await _started(gather_s=0.01)
    try:
        await asyncio.gather(*(coalescer.admit(_req(f"first-{i}")) for i in range(3)))
        assert (await coalescer.admit(_req("alone"))).allowed  # nobody comes: it goes
        assert (await coalescer.admit(_req("next"))).allowed  # and the lane is idle again
    finally:
        await coalescer.stop()
    assert recorder.batches[1:] == [["alone"], ["next"]]


async def test_a_backlog_as_big_as_the_last_batch_grows_the_next_one() -> None:
    coalescer, recorder = await _started(gather_s=3600)  # woken by the count, not the bound
    try:
        await asyncio.gather(*(coalescer.admit(_req(f"first-{i}")) for i in range(3)))
        # three queue up at once, as many as the last batch: the load outgrows batches of
        # three, so the lane waits for six
        early = [asyncio.ensure_future(coalescer.admit(_req(f"a{i}"))) for i in range(3)]
        for _ in range(5):
            await asyncio.sleep(0)
        assert not any(f.done() for f in early)
        late = [asyncio.ensure_future(coalescer.admit(_req(f"b{i}"))) for i in range(3)]
        await asyncio.wait_for(asyncio.gather(*early, *late), 60)  # safety net only
    finally:
        await coalescer.stop()
    assert recorder.batches == [
        ["first-0", "first-1", "first-2"],
        ["a0", "a1", "a2", "b0", "b1", "b2"],
    ]


class _Staller(_Recorder):
    """A batch holding tenant "stuck" waits (as on a row lock held elsewhere) until let go;
    with `rescue`, it first answers everyone else's requests in it (as run_batch does after
    a lock timeout, deciding them one by one)."""

    def __init__(self, *, rescue: bool = False) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.overflows: list[bool] = []
        self.rescue = rescue

    async def run_batch(
        self,
        reqs: Sequence[ConsumeRequest],
        *,
        shared: bool = False,
        answer: Callable[[int, Result], None] | None = None,
    ) -> list[Decision | QuotaError]:
        self.overflows.append(shared)
        if any(r.tenant_id == "stuck" for r in reqs):
            self.batches.append([r.request_id for r in reqs])
            if self.rescue and answer is not None:
                await asyncio.sleep(0.01)  # the lock timeout, in spirit
                for i, r in enumerate(reqs):
                    if r.tenant_id != "stuck":
                        answer(i, Decision(True, Reason.ALLOWED, ()))
            await self.release.wait()
            return [Decision(True, Reason.ALLOWED, ()) for _ in reqs]
        return await super().run_batch(reqs)


def _of(tenant_id: str, request_id: str) -> ConsumeRequest:
    return ConsumeRequest(tenant_id, "messages", 1, request_id)


@pytest.mark.parametrize("stall_s", [0.05, 0])
async def test_a_stalled_batch_holds_up_its_own_tenants_only(stall_s: float) -> None:
    """Past stall_s the lane goes on beside a stalled batch (on the shared pool) with
    everyone else's requests; the stalled tenant's later request waits for it, keeping its
    order. With stall_s=0 the lane waits for every batch."""
    staller = _Staller()
    coalescer = Coalescer(cast(QuotaEngine, staller), lanes=1, gather_s=0, stall_s=stall_s)
    coalescer.start()
    try:
        first = asyncio.ensure_future(coalescer.admit(_of("stuck", "s1")))
        await asyncio.sleep(0.01)  # its batch is running, and stalls
        later = asyncio.ensure_future(coalescer.admit(_of("stuck", "s2")))
        others = [asyncio.ensure_future(coalescer.admit(_of(f"t{i}", f"o{i}"))) for i in range(3)]
        done, _ = await asyncio.wait(others, timeout=1)
        if stall_s:
            assert done == set(others)  # decided beside the stalled batch
            assert coalescer.overtaken == 1 and staller.overflows == [False, True]
        else:
            assert not done and coalescer.overtaken == 0  # held up behind it
        assert not first.done() and not later.done()
        staller.release.set()
        await asyncio.wait_for(asyncio.gather(first, later, *others), 60)  # safety net only
    finally:
        await coalescer.stop()
    if stall_s:
        assert staller.batches == [["s1"], ["o0", "o1", "o2"], ["s2"]]
    else:
        assert staller.batches == [["s1"], ["s2", "o0", "o1", "o2"]]


async def test_tenants_a_stalled_batch_answered_early_go_on_without_it() -> None:
    """A stalled batch that answers its other tenants' requests early (decided one by one
    after its lock timeout) lets those tenants go: their next requests are decided while
    it still waits; the stuck tenant's next request still waits for it."""
    staller = _Staller(rescue=True)
    coalescer = Coalescer(cast(QuotaEngine, staller), lanes=1, gather_s=0, stall_s=3600)
    coalescer.start()
    try:
        first = [
            asyncio.ensure_future(coalescer.admit(_of(t, r)))
            for t, r in (("stuck", "s1"), ("a", "a1"), ("b", "b1"))
        ]
        done, _ = await asyncio.wait(first, timeout=10)
        assert done == set(first[1:])  # answered while the batch waits on
        later = [
            asyncio.ensure_future(coalescer.admit(_of(t, r)))
            for t, r in (("stuck", "s2"), ("a", "a2"))
        ]
        done, _ = await asyncio.wait(later, timeout=10)
        # the stall bound is an hour: a2 went beside the batch because its tenant was let go
        assert done == {later[1]} and not first[0].done()
        staller.release.set()
        await asyncio.wait_for(asyncio.gather(*first, *later), 60)  # safety net only
    finally:
        await coalescer.stop()
    assert staller.batches == [["s1", "a1", "b1"], ["a2"], ["s2"]]


class _Sleeper(_Recorder):
    """Each batch takes its own time (some far past stall_s), and some answer all but their
    first tenant's requests early (as a batch decided one by one after a lock timeout does);
    checks that no two batches share a tenant whose requests are not all answered."""

    def __init__(self, delays: list[float], early: list[bool]) -> None:
        super().__init__()
        self.delays = delays
        self.early = early
        self.running: set[str] = set()

    async def run_batch(
        self,
        reqs: Sequence[ConsumeRequest],
        *,
        shared: bool = False,
        answer: Callable[[int, Result], None] | None = None,
    ) -> list[Decision | QuotaError]:
        tenants = {r.tenant_id for r in reqs}
        assert not tenants & self.running, "two running batches share a tenant"
        self.running |= tenants
        self.batches.append([r.request_id for r in reqs])
        n = len(self.batches)
        if self.early[n % len(self.early)] and answer is not None:
            await asyncio.sleep(0)
            for i, r in enumerate(reqs):
                if r.tenant_id != reqs[0].tenant_id:
                    self.running.discard(r.tenant_id)
                    answer(i, Decision(True, Reason.ALLOWED, ()))
            tenants = {reqs[0].tenant_id}
        await asyncio.sleep(self.delays[n % len(self.delays)])
        self.running -= tenants
        return [Decision(True, Reason.ALLOWED, ()) for _ in reqs]


@settings(max_examples=40, deadline=None)
@given(
    arrivals=st.lists(
        st.tuples(st.sampled_from("abcde"), st.sampled_from([0, 0, 0, 0.001, 0.004])),
        min_size=1,
        max_size=40,
    ),
    delays=st.lists(st.sampled_from([0, 0.001, 0.003, 0.02]), min_size=1, max_size=6),
    early=st.lists(st.booleans(), min_size=1, max_size=6),
    max_batch=st.sampled_from([2, 3, 128]),
)
async def test_batches_beside_stalled_ones_keep_each_tenants_order(
    arrivals: list[tuple[str, float]], delays: list[float], early: list[bool], max_batch: int
) -> None:
    """Whatever the arrivals, however long each batch takes (stall_s is 2 ms here), whether
    it answers some tenants early, and however small batches must be: every request is
    decided exactly once, batches that run at once share no tenant with requests still
    unanswered, and each tenant's requests are decided in arrival order."""
    sleeper = _Sleeper(delays, early)
    coalescer = Coalescer(
        cast(QuotaEngine, sleeper), lanes=1, max_batch=max_batch, gather_s=0.001, stall_s=0.002
    )
    coalescer.start()
    try:
        calls = []
        for i, (tenant, pause) in enumerate(arrivals):
            calls.append(asyncio.ensure_future(coalescer.admit(_of(tenant, f"{tenant}{i}"))))
            await asyncio.sleep(pause)
        await asyncio.wait_for(asyncio.gather(*calls), 60)  # safety net only
    finally:
        await coalescer.stop()
    decided = [request_id for batch in sleeper.batches for request_id in batch]
    assert sorted(decided) == sorted(f"{t}{i}" for i, (t, _) in enumerate(arrivals))
    for tenant in "abcde":
        mine = [r for r in decided if r.startswith(tenant)]
        assert mine == sorted(mine, key=lambda r: int(r[1:]))
