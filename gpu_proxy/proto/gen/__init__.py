"""Generated from gpu_proxy/proto/events.proto by `python -m gpu_proxy.proto.protogen`;
nothing in this package is edited by hand."""
