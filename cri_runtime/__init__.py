"""vgpu-runtime: the CRI v1 server that runs each pod as a zone (lands with its own issue)."""
