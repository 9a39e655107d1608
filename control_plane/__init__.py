"""The Starlette billing control plane: admin/integration API, webhooks, billing UI."""
