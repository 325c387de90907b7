"""libvgpu: the zone's libcuda.so.1, in C (libvgpu/src); ``python -m libvgpu.build`` builds it.

Nothing of it runs in Python: this package only holds the build (libvgpu/build.py)."""
