"""CUDA module images (cubin, fatbin, PTX) parsed the way the driver accepts them, so the sim
backend can run them and the proxy can marshal `cuLaunchKernel` parameters."""

from gpu_proxy.modules.elf import (
    GlobalInfo,
    KernelAttributes,
    KernelInfo,
    ModuleImageError,
    NoCompatibleImageError,
    ParamInfo,
)
from gpu_proxy.modules.fatbin import (
    EntryKind,
    FatbinEntry,
    ImageKind,
    ModuleImage,
    parse_module_image,
)

__all__ = [
    "EntryKind",
    "FatbinEntry",
    "GlobalInfo",
    "ImageKind",
    "KernelAttributes",
    "KernelInfo",
    "ModuleImage",
    "ModuleImageError",
    "NoCompatibleImageError",
    "ParamInfo",
    "parse_module_image",
]
