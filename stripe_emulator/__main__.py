"""`python -m stripe_emulator`: the local Stripe on STRIPE_EMULATOR_HOST:STRIPE_EMULATOR_PORT."""

from __future__ import annotations

import sys

import uvicorn

from billing_core.errors import QuotaError
from billing_core.logs import configure_logging
from billing_core.settings import Settings
from stripe_emulator.app import create_app


def main() -> int:
    try:
        settings = Settings.from_env()
    except QuotaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.stripe_emulator_host,
        port=settings.stripe_emulator_port,
        log_level="warning",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
