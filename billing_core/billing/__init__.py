"""The billing use cases: plans, tenants, subscriptions and trials, payments through the
provider, webhooks, wallet grants, model prices, usage records and API keys. Each change
runs in the caller's unit of work and writes its audit entry there."""
