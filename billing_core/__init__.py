"""The shared billing domain: schema, quota engine and pure rules; no transport, no Stripe."""
