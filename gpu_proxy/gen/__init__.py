"""Generated gpu-proxy code (see idm/codegen.py); nothing in this package is edited by hand."""
