"""The gRPC quota sidecar: a thin transport over billing_core's quota engine."""
