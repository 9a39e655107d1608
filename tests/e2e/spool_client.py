"""A client process for the fail-open test: `allow` makes calls allowed open into a spool
and then dies by SIGKILL (no clean-up of any kind); `drain` opens the same spool and
waits until everything in it has been reported."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from quota_client import FailureMode, QuotaClient


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["allow", "drain"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--tenant", default="")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    client = QuotaClient(
        args.target, spool_path=args.spool, retries=0, default_timeout=0.3, drain_interval=0.2
    )
    if args.mode == "allow":
        allowed = sum(
            client.check_and_consume(
                args.tenant, "messages", 1, request_id=f"open-{n}", failure_mode=FailureMode.OPEN
            ).allowed
            for n in range(args.calls)
        )
        print(allowed, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # killed: the spool is all that is left
    deadline = time.monotonic() + 30
    while client.pending_spooled() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = client.pending_spooled()
    print(left, flush=True)
    client.close()
    return 0 if left == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
