"""The control plane's HTTP API: schemas, the endpoint table, problem responses, auth."""
