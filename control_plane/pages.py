"""The pages the payment provider sends a browser back to: after checkout (success or
canceled) and from the billing portal. They change nothing; state comes by webhook."""

from __future__ import annotations

from html import escape

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response

_PAGE = (
    "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
    "<style>body{{font:16px system-ui;max-width:36rem;margin:3rem auto;padding:0 1rem}}"
    "</style></head><body><h1>{title}</h1><p id='{id}'>{text}</p></body></html>"
)


def _page(title: str, element_id: str, text: str) -> HTMLResponse:
    return HTMLResponse(
        _PAGE.format(title=escape(title), id=element_id, text=escape(text)),
        headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"},
    )


async def checkout_return(request: Request) -> Response:
    """After a successful checkout: the subscription is activated by the provider's webhook,
    not by this page."""
    return _page(
        "Payment received — activating…",
        "activating",
        "Thank you. Your subscription becomes active as soon as Stripe confirms the payment "
        "to us, usually within seconds. This page does not change your plan by itself.",
    )


async def billing(request: Request) -> Response:
    """Where a canceled checkout and the billing portal send the browser back."""
    if request.query_params.get("checkout") == "canceled":
        return _page(
            "Checkout canceled",
            "canceled",
            "Nothing was charged and your plan is unchanged. You can choose a plan again "
            "from the app whenever you like.",
        )
    return _page(
        "Back from billing",
        "returned",
        "Changes you made in the billing portal take effect within seconds. Open billing "
        "from the app to see your plan, usage and invoices.",
    )
