"""The platform's backend sending its users to their billing pages: from the settings
screen (the overview), and after a refused call (the page that says why and what would
allow more). Uses the control plane's HTTP API through quota_client.admin.

    python -m examples.billing_links --control-plane http://127.0.0.1:8000 --key "$KEY" \
        --tenant acme --resource tokens

Prints both links as JSON. A link is signed, names one tenant, expires in minutes and is
audited; send the signed-in user's browser to it (a redirect), never show it to others.
"""

from __future__ import annotations

import argparse
import json
import sys

from quota_client.admin import AdminClient


def link_for_user(control_plane: str, key: str, tenant: str, return_url: str) -> str:
    """The user opened "Billing" in the app: their overview, with a way back."""
    with AdminClient(control_plane, key) as admin:
        link = admin.create_billing_link(tenant, return_url=return_url, expires_in_seconds=300)
    return str(link["url"])


def link_for_denial(control_plane: str, key: str, tenant: str, resource: str) -> str:
    """A call was refused (allowed=false): the limit page of that resource explains the
    window, when it resets and which plan would allow more."""
    with AdminClient(control_plane, key) as admin:
        link = admin.create_billing_link(tenant, expires_in_seconds=300, opens=f"limits/{resource}")
    return str(link["url"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--control-plane", default="http://127.0.0.1:8000")
    parser.add_argument("--key", required=True, help="an admin API key")
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--resource", default="tokens")
    parser.add_argument("--return-url", default="https://app.example.com/settings")
    args = parser.parse_args(argv)
    links = {
        "overview": link_for_user(args.control_plane, args.key, args.tenant, args.return_url),
        "limit_page": link_for_denial(args.control_plane, args.key, args.tenant, args.resource),
    }
    print(json.dumps(links), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
