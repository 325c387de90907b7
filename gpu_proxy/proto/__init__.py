"""gpu-proxy's gRPC APIs: the zone event stream (events.proto) and zone control (control.proto).

Generated code lives in gen/ (python -m gpu_proxy.proto.protogen; --check in CI)."""
