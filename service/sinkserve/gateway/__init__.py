"""The gRPC gateway: public API `sinkserve.v1`, sessions, auth, limits; Triton does the work."""
