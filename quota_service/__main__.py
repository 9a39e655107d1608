"""`python -m quota_service`: run the sidecar until SIGINT/SIGTERM, then drain."""

from __future__ import annotations

import asyncio
import signal

import structlog

from billing_core.logs import configure_logging
from billing_core.settings import Settings
from quota_service.server import create_server

log = structlog.get_logger(__name__)


async def serve(settings: Settings) -> None:
    server = await create_server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("quota_service_draining", grace_seconds=settings.drain_seconds)
    await server.stop()


def main() -> None:
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
