"""A loaded module's kernel table as gpu-proxy sends it to libvgpu (`vgpuModuleGetKernels`).

`cuLaunchKernel`'s `kernelParams` carry no sizes and `cuFuncGetAttribute` is answered in the
zone, so libvgpu needs every kernel's parameter layout and attributes. gpu-proxy already reads
them from the image it loads (gpu_proxy/modules, which also decodes zstd entries); sending them
keeps one parser, in Dom0, instead of a second one in every zone.

A page, little-endian (decoded by libvgpu/src/kernel_table.c)::

    u32 total kernels in the module, u32 kernels in this page
    per kernel:
      u16 name length, the name (no NUL)
      u32 parameter buffer bytes, u32 parameter count
      u32 attributes known (cubin code: 1; PTX: 0, the driver knows them after compiling)
      u32 registers, static shared bytes, constant bytes, local bytes, launch-bound threads, SM
      per parameter: u16 offset, u16 size

A page holds whole entries, from kernel `first` on, as many as fit in the size asked for.
Offsets and sizes fit in 16 bits because CUDA limits a parameter buffer to 32764 bytes.
"""

import struct
from collections.abc import Sequence

from gpu_proxy.errors import InvalidValue
from gpu_proxy.modules import KernelAttributes, KernelInfo

_PAGE = struct.Struct("<II")
_NAME = struct.Struct("<H")
_FIXED = struct.Struct("<IIIIIIIII")
_PARAM = struct.Struct("<HH")
_NO_ATTRIBUTES = KernelAttributes()


def encode_entry(kernel: KernelInfo) -> bytes:
    name = kernel.name.encode()
    if len(name) > 0xFFFF:
        raise InvalidValue(f"kernel name of {len(name)} bytes does not fit the kernel table")
    if any(p.offset > 0xFFFF or p.size > 0xFFFF for p in kernel.params):
        raise InvalidValue(f"kernel {kernel.name[:200]!r} has parameters past 64 KiB")
    attrs = kernel.attributes or _NO_ATTRIBUTES
    fixed = _FIXED.pack(
        kernel.param_bytes,
        len(kernel.params),
        kernel.attributes is not None,
        attrs.num_regs,
        attrs.shared_static,
        attrs.const_bytes,
        attrs.local_bytes,
        attrs.max_threads,
        attrs.arch,
    )
    params = b"".join(_PARAM.pack(p.offset, p.size) for p in kernel.params)
    return _NAME.pack(len(name)) + name + fixed + params


def encode_page(kernels: Sequence[KernelInfo], first: int, size: int) -> bytes:
    """Entries of `kernels[first:]` that fit in `size` bytes (at least one, or InvalidValue)."""
    if first > len(kernels):
        raise InvalidValue(f"kernel {first} asked for; the module has {len(kernels)}")
    entries: list[bytes] = []
    used = _PAGE.size
    for kernel in kernels[first:]:
        entry = encode_entry(kernel)
        if used + len(entry) > size:
            if not entries:
                raise InvalidValue(
                    f"kernel {kernel.name[:200]!r} needs a {used + len(entry)}-byte page, "
                    f"{size} asked for"
                )
            break
        entries.append(entry)
        used += len(entry)
    return _PAGE.pack(len(kernels), len(entries)) + b"".join(entries)
