"""Admin use cases behind the control plane's HTTP API: each change runs in one
transaction together with its audit-log entry; reads return plain dataclasses."""
