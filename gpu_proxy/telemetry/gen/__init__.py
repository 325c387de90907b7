"""Generated from gpu_proxy/telemetry/events.proto by `python -m gpu_proxy.telemetry.protogen`;
nothing in this package is edited by hand."""
