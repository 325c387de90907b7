"""What both Dom0 daemons (gpu-proxy and vgpu-runtime) share: how settings are loaded and how
logs are written, so an operator configures and reads them the same way."""
