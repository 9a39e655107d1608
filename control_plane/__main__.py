"""`python -m control_plane [serve|migrate|create-api-key|list-api-keys|revoke-api-key|
seed-demo|list-plans|expire-trials]`: the control plane and the operator's commands."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import uvicorn

from billing_core.billing import api_keys, demo, plans, subscriptions
from billing_core.billing.api_keys import SCOPES, create_api_key
from billing_core.db.migrate import upgrade
from billing_core.db.unit_of_work import Database, UnitOfWork
from billing_core.errors import QuotaError
from billing_core.logs import configure_logging
from billing_core.settings import Settings
from control_plane.app import create_app

ACTOR = "cli"


async def _in_transaction(
    settings: Settings, work: Callable[[UnitOfWork], Awaitable[None]]
) -> None:
    db = await Database.open(settings.require_database(), 1)
    try:
        async with db.transaction() as uow:
            await work(uow)
    finally:
        await db.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m control_plane", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the HTTP control plane (the default)")
    key = sub.add_parser("create-api-key", help="create an API key and print it once")
    key.add_argument("--name", default="admin", help="a label for the key")
    key.add_argument("--scope", choices=SCOPES, default="admin", help="read: GET requests only")
    sub.add_parser("list-api-keys", help="print the keys (id, prefix, scope, name, state)")
    revoke = sub.add_parser("revoke-api-key", help="revoke a key at once")
    revoke.add_argument("api_key_id")
    sub.add_parser("seed-demo", help="create the demo plans, prices and tenants (once)")
    sub.add_parser("list-plans", help="print the plans")
    sub.add_parser("expire-trials", help="move trials past their end to trial_expired")
    sub.add_parser("migrate", help="apply database migrations")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure_logging(settings.log_level, settings.log_format)
    now = datetime.now(UTC)
    try:
        if args.command in (None, "serve"):
            uvicorn.run(
                create_app(settings),
                host=settings.http_host,
                port=settings.http_port,
                log_level="warning",
            )
        elif args.command == "migrate":
            upgrade(settings.require_database())
        elif args.command == "create-api-key":

            async def make_key(uow: UnitOfWork) -> None:
                print((await create_api_key(uow, ACTOR, args.name, now, scope=args.scope)).key)

            asyncio.run(_in_transaction(settings, make_key))
        elif args.command == "list-api-keys":

            async def list_keys(uow: UnitOfWork) -> None:
                cursor = None
                while True:
                    page = await api_keys.list_api_keys(uow, limit=500, cursor=cursor)
                    for k in page.items:
                        state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "live"
                        print(f"{k.api_key_id}\t{k.prefix}…\t{k.scope}\t{k.name}\t{state}")
                    if (cursor := page.next_cursor) is None:
                        break

            asyncio.run(_in_transaction(settings, list_keys))
        elif args.command == "revoke-api-key":

            async def revoke_key(uow: UnitOfWork) -> None:
                view = await api_keys.revoke_api_key(uow, ACTOR, args.api_key_id, now)
                print(f"revoked {view.api_key_id} ({view.prefix}…)")

            asyncio.run(_in_transaction(settings, revoke_key))
        elif args.command == "seed-demo":

            async def seed(uow: UnitOfWork) -> None:
                print("seeded" if await demo.seed_demo(uow, now) else "already seeded")

            asyncio.run(_in_transaction(settings, seed))
        elif args.command == "list-plans":

            async def list_plans(uow: UnitOfWork) -> None:
                cursor = None
                while True:
                    page = await plans.list_plans(uow, limit=200, cursor=cursor)
                    for view in page.items:
                        spec = view.spec
                        price = f"{spec.price_cents // 100}.{spec.price_cents % 100:02d}"
                        state = "active" if spec.active else "archived"
                        print(f"{view.plan_id}\t{spec.name}\t{price} {spec.currency}\t{state}")
                    if (cursor := page.next_cursor) is None:
                        break

            asyncio.run(_in_transaction(settings, list_plans))
        elif args.command == "expire-trials":

            async def expire(uow: UnitOfWork) -> None:
                expired = await subscriptions.expire_trials(uow, ACTOR, now)
                print(f"expired {expired} trial(s)")

            asyncio.run(_in_transaction(settings, expire))
    except QuotaError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
