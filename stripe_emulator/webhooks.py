"""Signed webhook delivery with retries and backoff; optional duplicates and shuffling."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog

log = structlog.get_logger()
BACKOFF_SECONDS = (0.1, 0.3, 1.0, 2.0, 5.0, 10.0)


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    """Stripe's scheme: `t=<unix>,v1=<hex HMAC-SHA256 of "<t>.<payload>">`."""
    ts = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{ts}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={ts},v1={mac}"


@dataclass
class WebhookConfig:
    url: str | None = None
    secret: str | None = None
    copies: int = 1  # >1: every event is delivered that many times
    shuffle: bool = False  # deliver what is queued in random order, concurrently
    paused: bool = False


@dataclass
class WebhookSender:
    config: WebhookConfig
    queue: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    delivered: int = 0
    failed_attempts: int = 0
    in_flight: int = 0
    _task: asyncio.Task[None] | None = None
    _client: httpx.AsyncClient | None = None

    def enqueue(self, event: dict[str, Any]) -> None:
        for _ in range(max(1, self.config.copies)):
            self.queue.put_nowait(event)

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=10.0)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client:
            await self._client.aclose()

    async def idle(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued was delivered (or gave up)."""
        deadline = time.monotonic() + timeout_s
        while self.queue.qsize() or self.in_flight:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _run(self) -> None:
        while True:
            first = await self.queue.get()
            while self.config.paused:  # noqa: ASYNC110 - a switch flipped by tests, polled
                await asyncio.sleep(0.05)
            batch = [first]
            if self.config.shuffle:
                await asyncio.sleep(0.05)  # let a burst gather
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                random.shuffle(batch)
            self.in_flight += len(batch)
            try:
                if self.config.shuffle:
                    await asyncio.gather(*(self._deliver(e) for e in batch))
                else:
                    await self._deliver(first)
            finally:
                self.in_flight -= len(batch)

    async def _deliver(self, event: dict[str, Any]) -> None:
        url, secret = self.config.url, self.config.secret
        if not url or not secret or self._client is None:
            return
        payload = json.dumps(event).encode()
        for attempt, pause in enumerate((0.0, *BACKOFF_SECONDS)):
            await asyncio.sleep(pause)
            headers = {
                "Content-Type": "application/json",
                "Stripe-Signature": sign(payload, secret),
            }
            try:
                response = await self._client.post(url, content=payload, headers=headers)
                if response.is_success:
                    self.delivered += 1
                    return
                status: Any = response.status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            self.failed_attempts += 1
            log.warning("webhook_retry", event_id=event["id"], attempt=attempt + 1, status=status)
        log.error("webhook_gave_up", event_id=event["id"])
