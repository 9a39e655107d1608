"""A local stand-in for the parts of Stripe the product uses: the API (form-encoded, Stripe's
object and error shapes, Idempotency-Key), hosted checkout and portal pages, test clocks and
signed webhooks. The official `stripe` SDK talks to it unchanged."""
