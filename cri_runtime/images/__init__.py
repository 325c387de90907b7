"""Images for vgpu-runtime: references, registry client (OCI distribution v2), content store,
layer unpacking, per-host mirror configuration."""
