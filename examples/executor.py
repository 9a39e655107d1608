"""An AI executor's side of the quota sidecar: reserve before a model call, commit the
tokens it really used, and keep working through a sidecar outage without losing usage.

    python -m examples.executor --tenant acme --sidecar 127.0.0.1:50051 \
        --spool executor.spool --control-plane http://127.0.0.1:8000 --key "$KEY"

Each turn reserves the turn's token budget, runs the (simulated) model call, and commits
what the model reported; a denial sends the user to the billing page that says why
(examples/billing_links.py does that part). The spool holds what was allowed while the
sidecar could not be reached, reported once it answers again. Prints one JSON line per
turn and a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid

from quota_client import FailureMode, QuotaClient, QuotaUnavailable, Tokens

from examples.billing_links import link_for_denial

MODEL = ("openai", "gpt-4o-mini")


def model_call(prompt: str) -> tuple[str, int, int]:
    """Stands in for the model: (answer, input tokens, output tokens)."""
    answer = prompt.upper()
    return answer, 12 * len(prompt.split()), 8 * len(answer.split())


def run_turn(quota: QuotaClient, tenant: str, prompt: str, budget: int) -> dict[str, object]:
    """One turn: the reservation is released if the call fails, committed when it ran."""
    turn_id = str(uuid.uuid4())  # the idempotency key: a retried turn is counted once
    provider, model = MODEL
    with quota.reserve(
        tenant,
        "tokens",
        budget,
        request_id=turn_id,
        tokens=Tokens(provider, model, budget, 0),  # what the wallet holds for the overage
        labels={"feature": "chat"},
        failure_mode=FailureMode.OPEN,  # a sidecar outage must not stop the product
    ) as held:
        if not held.allowed:
            return {
                "turn": turn_id,
                "allowed": False,
                "reason": held.response.message,
                "resource": "tokens",
            }
        answer, used_in, used_out = model_call(prompt)
        committed = held.commit(
            used_in + used_out, tokens=Tokens(provider, model, used_in, used_out)
        )
    return {
        "turn": turn_id,
        "allowed": True,
        "answer": answer,
        "tokens": used_in + used_out,
        "cost_micros": committed.cost_micros,
        # allowed while the sidecar could not be reached: spooled, counted once it answers
        "fell_open": not committed.usage_record_id,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--sidecar", default="127.0.0.1:50051")
    parser.add_argument("--spool", default="executor.spool")
    parser.add_argument("--control-plane", default="http://127.0.0.1:8000")
    parser.add_argument("--key", default="", help="an admin API key, for the denial's link")
    parser.add_argument("--budget", type=int, default=2_000, help="tokens reserved per turn")
    parser.add_argument("prompts", nargs="*", default=["hello there", "summarise the report"])
    args = parser.parse_args(argv)
    turns = []
    with QuotaClient(args.sidecar, spool_path=args.spool) as quota:
        for prompt in args.prompts:
            turn = run_turn(quota, args.tenant, prompt, args.budget)
            if not turn["allowed"] and args.key:
                turn["billing_link"] = link_for_denial(
                    args.control_plane, args.key, args.tenant, "tokens"
                )
            turns.append(turn)
            print(json.dumps(turn), flush=True)
        waiting = quota.drain_spool()  # report what fell open, now that we stop
        try:
            usage = quota.get_usage(args.tenant, "tokens")
            used: int | None = usage.resources[0].windows[0].used
        except QuotaUnavailable:
            used = None  # the sidecar is still away: the spool keeps the usage
    summary = {
        "turns": len(turns),
        "allowed": sum(1 for t in turns if t["allowed"]),
        "spooled_waiting": waiting,
        "tokens_used_today": used,
    }
    print(json.dumps({"summary": summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
