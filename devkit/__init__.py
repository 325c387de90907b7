"""Tools for running vgpu-isolated on a dev machine without a cluster: a loopback OCI registry,
image pushing, a busybox userland, our daemons as child processes, and the demo
(``python -m devkit.demo``). The test suites use the same code, so the demo cannot drift from
what the tests exercise."""
