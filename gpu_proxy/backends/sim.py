"""A GPU backend for machines without a GPU: device memory is host memory, each stream is a
worker thread, and kernels are validated and recorded in stream order but never executed.

It is honest by construction: every byte a zone reads back was written by the zone's own copy
or memset, and a launch leaves device memory untouched rather than inventing a result. Event
times are time.perf_counter_ns taken when the event's marker is reached in stream order.
"""

from __future__ import annotations

import bisect
import enum
import mmap
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpu_proxy.backends.base import (
    Buffer,
    Context,
    DeviceGlobal,
    DeviceInfo,
    Event,
    Fill,
    Function,
    Module,
    Stream,
)
from gpu_proxy.errors import (
    InvalidContext,
    InvalidHandle,
    InvalidImage,
    InvalidValue,
    NoBinaryForGpu,
    NotFound,
    NotReady,
    OutOfMemory,
)
from gpu_proxy.modules import (
    KernelInfo,
    ModuleImage,
    ModuleImageError,
    NoCompatibleImageError,
    parse_module_image,
)

DRIVER_VERSION = 13000
ADDRESS_BASE = 0x7F00_0000_0000
ALIGNMENT = 256
CU_STREAM_NON_BLOCKING = 0x1
CU_EVENT_DISABLE_TIMING = 0x2
_EVENT_FLAGS = 0x7  # BLOCKING_SYNC | DISABLE_TIMING | INTERPROCESS
# Copies and memsets go in slices so a huge operation needs no equally huge temporary.
_CHUNK = 64 << 20
_UUID_NAMESPACE = uuid.UUID("5b0d7a52-61c1-4b8e-9c8e-2f4f3c6a0e11")


class Attr(enum.IntEnum):
    """CUdevice_attribute as in CUDA 13's cuda.h: every number once (where cuda.h has a
    deprecated alias for a number, the current name)."""

    MAX_THREADS_PER_BLOCK = 1
    MAX_BLOCK_DIM_X = 2
    MAX_BLOCK_DIM_Y = 3
    MAX_BLOCK_DIM_Z = 4
    MAX_GRID_DIM_X = 5
    MAX_GRID_DIM_Y = 6
    MAX_GRID_DIM_Z = 7
    MAX_SHARED_MEMORY_PER_BLOCK = 8
    TOTAL_CONSTANT_MEMORY = 9
    WARP_SIZE = 10
    MAX_PITCH = 11
    MAX_REGISTERS_PER_BLOCK = 12
    CLOCK_RATE = 13
    TEXTURE_ALIGNMENT = 14
    GPU_OVERLAP = 15
    MULTIPROCESSOR_COUNT = 16
    KERNEL_EXEC_TIMEOUT = 17
    INTEGRATED = 18
    CAN_MAP_HOST_MEMORY = 19
    COMPUTE_MODE = 20
    MAXIMUM_TEXTURE1D_WIDTH = 21
    MAXIMUM_TEXTURE2D_WIDTH = 22
    MAXIMUM_TEXTURE2D_HEIGHT = 23
    MAXIMUM_TEXTURE3D_WIDTH = 24
    MAXIMUM_TEXTURE3D_HEIGHT = 25
    MAXIMUM_TEXTURE3D_DEPTH = 26
    MAXIMUM_TEXTURE2D_LAYERED_WIDTH = 27
    MAXIMUM_TEXTURE2D_LAYERED_HEIGHT = 28
    MAXIMUM_TEXTURE2D_LAYERED_LAYERS = 29
    SURFACE_ALIGNMENT = 30
    CONCURRENT_KERNELS = 31
    ECC_ENABLED = 32
    PCI_BUS_ID = 33
    PCI_DEVICE_ID = 34
    TCC_DRIVER = 35
    MEMORY_CLOCK_RATE = 36
    GLOBAL_MEMORY_BUS_WIDTH = 37
    L2_CACHE_SIZE = 38
    MAX_THREADS_PER_MULTIPROCESSOR = 39
    ASYNC_ENGINE_COUNT = 40
    UNIFIED_ADDRESSING = 41
    MAXIMUM_TEXTURE1D_LAYERED_WIDTH = 42
    MAXIMUM_TEXTURE1D_LAYERED_LAYERS = 43
    CAN_TEX2D_GATHER = 44
    MAXIMUM_TEXTURE2D_GATHER_WIDTH = 45
    MAXIMUM_TEXTURE2D_GATHER_HEIGHT = 46
    MAXIMUM_TEXTURE3D_WIDTH_ALTERNATE = 47
    MAXIMUM_TEXTURE3D_HEIGHT_ALTERNATE = 48
    MAXIMUM_TEXTURE3D_DEPTH_ALTERNATE = 49
    PCI_DOMAIN_ID = 50
    TEXTURE_PITCH_ALIGNMENT = 51
    MAXIMUM_TEXTURECUBEMAP_WIDTH = 52
    MAXIMUM_TEXTURECUBEMAP_LAYERED_WIDTH = 53
    MAXIMUM_TEXTURECUBEMAP_LAYERED_LAYERS = 54
    MAXIMUM_SURFACE1D_WIDTH = 55
    MAXIMUM_SURFACE2D_WIDTH = 56
    MAXIMUM_SURFACE2D_HEIGHT = 57
    MAXIMUM_SURFACE3D_WIDTH = 58
    MAXIMUM_SURFACE3D_HEIGHT = 59
    MAXIMUM_SURFACE3D_DEPTH = 60
    MAXIMUM_SURFACE1D_LAYERED_WIDTH = 61
    MAXIMUM_SURFACE1D_LAYERED_LAYERS = 62
    MAXIMUM_SURFACE2D_LAYERED_WIDTH = 63
    MAXIMUM_SURFACE2D_LAYERED_HEIGHT = 64
    MAXIMUM_SURFACE2D_LAYERED_LAYERS = 65
    MAXIMUM_SURFACECUBEMAP_WIDTH = 66
    MAXIMUM_SURFACECUBEMAP_LAYERED_WIDTH = 67
    MAXIMUM_SURFACECUBEMAP_LAYERED_LAYERS = 68
    MAXIMUM_TEXTURE1D_LINEAR_WIDTH = 69
    MAXIMUM_TEXTURE2D_LINEAR_WIDTH = 70
    MAXIMUM_TEXTURE2D_LINEAR_HEIGHT = 71
    MAXIMUM_TEXTURE2D_LINEAR_PITCH = 72
    MAXIMUM_TEXTURE2D_MIPMAPPED_WIDTH = 73
    MAXIMUM_TEXTURE2D_MIPMAPPED_HEIGHT = 74
    COMPUTE_CAPABILITY_MAJOR = 75
    COMPUTE_CAPABILITY_MINOR = 76
    MAXIMUM_TEXTURE1D_MIPMAPPED_WIDTH = 77
    STREAM_PRIORITIES_SUPPORTED = 78
    GLOBAL_L1_CACHE_SUPPORTED = 79
    LOCAL_L1_CACHE_SUPPORTED = 80
    MAX_SHARED_MEMORY_PER_MULTIPROCESSOR = 81
    MAX_REGISTERS_PER_MULTIPROCESSOR = 82
    MANAGED_MEMORY = 83
    MULTI_GPU_BOARD = 84
    MULTI_GPU_BOARD_GROUP_ID = 85
    HOST_NATIVE_ATOMIC_SUPPORTED = 86
    SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO = 87
    PAGEABLE_MEMORY_ACCESS = 88
    CONCURRENT_MANAGED_ACCESS = 89
    COMPUTE_PREEMPTION_SUPPORTED = 90
    CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM = 91
    CAN_USE_STREAM_MEM_OPS_V1 = 92
    CAN_USE_64_BIT_STREAM_MEM_OPS_V1 = 93
    CAN_USE_STREAM_WAIT_VALUE_NOR_V1 = 94
    COOPERATIVE_LAUNCH = 95
    COOPERATIVE_MULTI_DEVICE_LAUNCH = 96
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97
    CAN_FLUSH_REMOTE_WRITES = 98
    HOST_REGISTER_SUPPORTED = 99
    PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES = 100
    DIRECT_MANAGED_MEM_ACCESS_FROM_HOST = 101
    VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 102
    HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED = 103
    HANDLE_TYPE_WIN32_HANDLE_SUPPORTED = 104
    HANDLE_TYPE_WIN32_KMT_HANDLE_SUPPORTED = 105
    MAX_BLOCKS_PER_MULTIPROCESSOR = 106
    GENERIC_COMPRESSION_SUPPORTED = 107
    MAX_PERSISTING_L2_CACHE_SIZE = 108
    MAX_ACCESS_POLICY_WINDOW_SIZE = 109
    GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED = 110
    RESERVED_SHARED_MEMORY_PER_BLOCK = 111
    SPARSE_CUDA_ARRAY_SUPPORTED = 112
    READ_ONLY_HOST_REGISTER_SUPPORTED = 113
    TIMELINE_SEMAPHORE_INTEROP_SUPPORTED = 114
    MEMORY_POOLS_SUPPORTED = 115
    GPU_DIRECT_RDMA_SUPPORTED = 116
    GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS = 117
    GPU_DIRECT_RDMA_WRITES_ORDERING = 118
    MEMPOOL_SUPPORTED_HANDLE_TYPES = 119
    CLUSTER_LAUNCH = 120
    DEFERRED_MAPPING_CUDA_ARRAY_SUPPORTED = 121
    CAN_USE_64_BIT_STREAM_MEM_OPS = 122
    CAN_USE_STREAM_WAIT_VALUE_NOR = 123
    DMA_BUF_SUPPORTED = 124
    IPC_EVENT_SUPPORTED = 125
    MEM_SYNC_DOMAIN_COUNT = 126
    TENSOR_MAP_ACCESS_SUPPORTED = 127
    HANDLE_TYPE_FABRIC_SUPPORTED = 128
    UNIFIED_FUNCTION_POINTERS = 129
    NUMA_CONFIG = 130
    NUMA_ID = 131
    MULTICAST_SUPPORTED = 132
    MPS_ENABLED = 133
    HOST_NUMA_ID = 134
    D3D12_CIG_SUPPORTED = 135
    MEM_DECOMPRESS_ALGORITHM_MASK = 136
    MEM_DECOMPRESS_MAXIMUM_LENGTH = 137
    VULKAN_CIG_SUPPORTED = 138
    GPU_PCI_DEVICE_ID = 139
    GPU_PCI_SUBSYSTEM_ID = 140
    HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 141
    HOST_NUMA_MEMORY_POOLS_SUPPORTED = 142
    HOST_NUMA_MULTINODE_IPC_SUPPORTED = 143
    HOST_MEMORY_POOLS_SUPPORTED = 144
    HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED = 145
    HOST_ALLOC_DMA_BUF_SUPPORTED = 146
    ONLY_PARTIAL_HOST_NATIVE_ATOMIC_SUPPORTED = 147


# PCI identity: vendor 0x10de (NVIDIA); a fixed, plausible slot (domain 0, bus 0x1b, device 0).
_NVIDIA = 0x10DE
_PCI_BUS = 0x1B
# CUflushGPUDirectRDMAWritesOptions: CU_FLUSH_GPU_DIRECT_RDMA_WRITES_OPTION_HOST.
_RDMA_FLUSH_HOST = 1
# CUmemAllocationHandleType: CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR.
_HANDLE_POSIX_FD = 1


@dataclass(frozen=True)
class GpuModel:
    """The published properties of one GPU model (NVIDIA's specifications and what the
    driver reports for it, as deviceQuery prints); limits shared by cc 8.x/9.x are defaults."""

    name: str
    compute_capability: tuple[int, int]
    total_mem: int
    sm_count: int
    clock_khz: int
    mem_clock_khz: int
    l2_bytes: int
    shared_per_sm: int
    shared_per_block_optin: int
    pci_device_id: int  # the PCI device id (lspci's 10de:XXXX)
    pci_subsystem_id: int  # the board's PCI subsystem id (subsystem vendor is NVIDIA)
    bus_width_bits: int = 5120
    max_threads_per_block: int = 1024
    max_block: tuple[int, int, int] = (1024, 1024, 64)
    max_grid: tuple[int, int, int] = (2**31 - 1, 65535, 65535)
    shared_per_block: int = 48 << 10
    constant_mem: int = 64 << 10
    warp_size: int = 32
    copy_engines: int = 3

    @property
    def arch(self) -> int:
        """The SM number module images are selected for (cc 9.0 -> 90)."""
        return self.compute_capability[0] * 10 + self.compute_capability[1]

    def attributes(self) -> dict[int, int]:
        """Every CUdevice_attribute of CUDA 13, keyed by number."""
        hopper = int(self.compute_capability[0] >= 9)  # thread block clusters, TMA, domains
        t2d, t3d, layered, layers = (131072, 65536), 16384, 32768, 2048
        values = {
            Attr.MAX_THREADS_PER_BLOCK: self.max_threads_per_block,
            Attr.MAX_BLOCK_DIM_X: self.max_block[0],
            Attr.MAX_BLOCK_DIM_Y: self.max_block[1],
            Attr.MAX_BLOCK_DIM_Z: self.max_block[2],
            Attr.MAX_GRID_DIM_X: self.max_grid[0],
            Attr.MAX_GRID_DIM_Y: self.max_grid[1],
            Attr.MAX_GRID_DIM_Z: self.max_grid[2],
            Attr.MAX_SHARED_MEMORY_PER_BLOCK: self.shared_per_block,
            Attr.TOTAL_CONSTANT_MEMORY: self.constant_mem,
            Attr.WARP_SIZE: self.warp_size,
            Attr.MAX_PITCH: 2**31 - 1,
            Attr.MAX_REGISTERS_PER_BLOCK: 65536,
            Attr.CLOCK_RATE: self.clock_khz,
            Attr.TEXTURE_ALIGNMENT: 512,
            Attr.GPU_OVERLAP: 1,
            Attr.MULTIPROCESSOR_COUNT: self.sm_count,
            Attr.KERNEL_EXEC_TIMEOUT: 0,
            Attr.INTEGRATED: 0,
            Attr.CAN_MAP_HOST_MEMORY: 1,
            Attr.COMPUTE_MODE: 0,  # CU_COMPUTEMODE_DEFAULT
            Attr.MAXIMUM_TEXTURE1D_WIDTH: t2d[0],
            Attr.MAXIMUM_TEXTURE2D_WIDTH: t2d[0],
            Attr.MAXIMUM_TEXTURE2D_HEIGHT: t2d[1],
            Attr.MAXIMUM_TEXTURE3D_WIDTH: t3d,
            Attr.MAXIMUM_TEXTURE3D_HEIGHT: t3d,
            Attr.MAXIMUM_TEXTURE3D_DEPTH: t3d,
            Attr.MAXIMUM_TEXTURE2D_LAYERED_WIDTH: layered,
            Attr.MAXIMUM_TEXTURE2D_LAYERED_HEIGHT: layered,
            Attr.MAXIMUM_TEXTURE2D_LAYERED_LAYERS: layers,
            Attr.SURFACE_ALIGNMENT: 512,
            Attr.CONCURRENT_KERNELS: 1,
            Attr.ECC_ENABLED: 1,
            Attr.PCI_BUS_ID: _PCI_BUS,
            Attr.PCI_DEVICE_ID: 0,
            Attr.TCC_DRIVER: 0,
            Attr.MEMORY_CLOCK_RATE: self.mem_clock_khz,
            Attr.GLOBAL_MEMORY_BUS_WIDTH: self.bus_width_bits,
            Attr.L2_CACHE_SIZE: self.l2_bytes,
            Attr.MAX_THREADS_PER_MULTIPROCESSOR: 2048,
            Attr.ASYNC_ENGINE_COUNT: self.copy_engines,
            Attr.UNIFIED_ADDRESSING: 1,
            Attr.MAXIMUM_TEXTURE1D_LAYERED_WIDTH: layered,
            Attr.MAXIMUM_TEXTURE1D_LAYERED_LAYERS: layers,
            Attr.CAN_TEX2D_GATHER: 1,
            Attr.MAXIMUM_TEXTURE2D_GATHER_WIDTH: layered,
            Attr.MAXIMUM_TEXTURE2D_GATHER_HEIGHT: layered,
            Attr.MAXIMUM_TEXTURE3D_WIDTH_ALTERNATE: 8192,
            Attr.MAXIMUM_TEXTURE3D_HEIGHT_ALTERNATE: 8192,
            Attr.MAXIMUM_TEXTURE3D_DEPTH_ALTERNATE: 32768,
            Attr.PCI_DOMAIN_ID: 0,
            Attr.TEXTURE_PITCH_ALIGNMENT: 32,
            Attr.MAXIMUM_TEXTURECUBEMAP_WIDTH: layered,
            Attr.MAXIMUM_TEXTURECUBEMAP_LAYERED_WIDTH: layered,
            Attr.MAXIMUM_TEXTURECUBEMAP_LAYERED_LAYERS: 2046,
            Attr.MAXIMUM_SURFACE1D_WIDTH: layered,
            Attr.MAXIMUM_SURFACE2D_WIDTH: t2d[0],
            Attr.MAXIMUM_SURFACE2D_HEIGHT: t2d[1],
            Attr.MAXIMUM_SURFACE3D_WIDTH: t3d,
            Attr.MAXIMUM_SURFACE3D_HEIGHT: t3d,
            Attr.MAXIMUM_SURFACE3D_DEPTH: t3d,
            Attr.MAXIMUM_SURFACE1D_LAYERED_WIDTH: layered,
            Attr.MAXIMUM_SURFACE1D_LAYERED_LAYERS: layers,
            Attr.MAXIMUM_SURFACE2D_LAYERED_WIDTH: layered,
            Attr.MAXIMUM_SURFACE2D_LAYERED_HEIGHT: layered,
            Attr.MAXIMUM_SURFACE2D_LAYERED_LAYERS: layers,
            Attr.MAXIMUM_SURFACECUBEMAP_WIDTH: layered,
            Attr.MAXIMUM_SURFACECUBEMAP_LAYERED_WIDTH: layered,
            Attr.MAXIMUM_SURFACECUBEMAP_LAYERED_LAYERS: 2046,
            Attr.MAXIMUM_TEXTURE1D_LINEAR_WIDTH: 1 << 28,
            Attr.MAXIMUM_TEXTURE2D_LINEAR_WIDTH: t2d[0],
            Attr.MAXIMUM_TEXTURE2D_LINEAR_HEIGHT: 65000,
            Attr.MAXIMUM_TEXTURE2D_LINEAR_PITCH: (2 << 20) - 32,
            Attr.MAXIMUM_TEXTURE2D_MIPMAPPED_WIDTH: layered,
            Attr.MAXIMUM_TEXTURE2D_MIPMAPPED_HEIGHT: layered,
            Attr.COMPUTE_CAPABILITY_MAJOR: self.compute_capability[0],
            Attr.COMPUTE_CAPABILITY_MINOR: self.compute_capability[1],
            Attr.MAXIMUM_TEXTURE1D_MIPMAPPED_WIDTH: layered,
            Attr.STREAM_PRIORITIES_SUPPORTED: 1,
            Attr.GLOBAL_L1_CACHE_SUPPORTED: 1,
            Attr.LOCAL_L1_CACHE_SUPPORTED: 1,
            Attr.MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: self.shared_per_sm,
            Attr.MAX_REGISTERS_PER_MULTIPROCESSOR: 65536,
            Attr.MANAGED_MEMORY: 1,
            Attr.MULTI_GPU_BOARD: 0,
            Attr.MULTI_GPU_BOARD_GROUP_ID: 0,
            Attr.HOST_NATIVE_ATOMIC_SUPPORTED: 0,  # PCIe to an x86 host
            Attr.SINGLE_TO_DOUBLE_PRECISION_PERF_RATIO: 2,
            Attr.PAGEABLE_MEMORY_ACCESS: 0,
            Attr.CONCURRENT_MANAGED_ACCESS: 1,
            Attr.COMPUTE_PREEMPTION_SUPPORTED: 1,
            Attr.CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: 1,
            Attr.CAN_USE_STREAM_MEM_OPS_V1: 1,
            Attr.CAN_USE_64_BIT_STREAM_MEM_OPS_V1: 1,
            Attr.CAN_USE_STREAM_WAIT_VALUE_NOR_V1: 1,
            Attr.COOPERATIVE_LAUNCH: 1,
            Attr.COOPERATIVE_MULTI_DEVICE_LAUNCH: 1,
            Attr.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: self.shared_per_block_optin,
            Attr.CAN_FLUSH_REMOTE_WRITES: 0,
            Attr.HOST_REGISTER_SUPPORTED: 1,
            Attr.PAGEABLE_MEMORY_ACCESS_USES_HOST_PAGE_TABLES: 0,
            Attr.DIRECT_MANAGED_MEM_ACCESS_FROM_HOST: 0,
            Attr.VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: 1,
            Attr.HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: 1,
            Attr.HANDLE_TYPE_WIN32_HANDLE_SUPPORTED: 0,
            Attr.HANDLE_TYPE_WIN32_KMT_HANDLE_SUPPORTED: 0,
            Attr.MAX_BLOCKS_PER_MULTIPROCESSOR: 32,
            Attr.GENERIC_COMPRESSION_SUPPORTED: 1,
            Attr.MAX_PERSISTING_L2_CACHE_SIZE: self.l2_bytes * 3 // 4,  # set-aside: 75% of L2
            Attr.MAX_ACCESS_POLICY_WINDOW_SIZE: (128 << 20) - (4 << 10),
            Attr.GPU_DIRECT_RDMA_WITH_CUDA_VMM_SUPPORTED: 1,
            Attr.RESERVED_SHARED_MEMORY_PER_BLOCK: 1024,
            Attr.SPARSE_CUDA_ARRAY_SUPPORTED: 1,
            Attr.READ_ONLY_HOST_REGISTER_SUPPORTED: 1,
            Attr.TIMELINE_SEMAPHORE_INTEROP_SUPPORTED: 1,
            Attr.MEMORY_POOLS_SUPPORTED: 1,
            Attr.GPU_DIRECT_RDMA_SUPPORTED: 1,
            Attr.GPU_DIRECT_RDMA_FLUSH_WRITES_OPTIONS: _RDMA_FLUSH_HOST,
            Attr.GPU_DIRECT_RDMA_WRITES_ORDERING: 0,
            Attr.MEMPOOL_SUPPORTED_HANDLE_TYPES: _HANDLE_POSIX_FD,
            Attr.CLUSTER_LAUNCH: hopper,
            Attr.DEFERRED_MAPPING_CUDA_ARRAY_SUPPORTED: 1,
            Attr.CAN_USE_64_BIT_STREAM_MEM_OPS: 1,
            Attr.CAN_USE_STREAM_WAIT_VALUE_NOR: 1,
            Attr.DMA_BUF_SUPPORTED: 1,
            Attr.IPC_EVENT_SUPPORTED: 1,
            Attr.MEM_SYNC_DOMAIN_COUNT: 4 if hopper else 1,
            Attr.TENSOR_MAP_ACCESS_SUPPORTED: hopper,
            Attr.HANDLE_TYPE_FABRIC_SUPPORTED: 0,
            Attr.UNIFIED_FUNCTION_POINTERS: 0,
            Attr.NUMA_CONFIG: 0,  # CU_DEVICE_NUMA_CONFIG_NONE
            Attr.NUMA_ID: -1,
            Attr.MULTICAST_SUPPORTED: 0,
            Attr.MPS_ENABLED: 0,
            Attr.HOST_NUMA_ID: 0,
            Attr.D3D12_CIG_SUPPORTED: 0,
            Attr.MEM_DECOMPRESS_ALGORITHM_MASK: 0,  # decompression engines came with Blackwell
            Attr.MEM_DECOMPRESS_MAXIMUM_LENGTH: 0,
            Attr.VULKAN_CIG_SUPPORTED: 0,
            Attr.GPU_PCI_DEVICE_ID: self.pci_device_id << 16 | _NVIDIA,
            Attr.GPU_PCI_SUBSYSTEM_ID: self.pci_subsystem_id << 16 | _NVIDIA,
            Attr.HOST_NUMA_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: 0,
            Attr.HOST_NUMA_MEMORY_POOLS_SUPPORTED: 0,
            Attr.HOST_NUMA_MULTINODE_IPC_SUPPORTED: 0,
            Attr.HOST_MEMORY_POOLS_SUPPORTED: 0,
            Attr.HOST_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: 0,
            Attr.HOST_ALLOC_DMA_BUF_SUPPORTED: 0,
            Attr.ONLY_PARTIAL_HOST_NATIVE_ATOMIC_SUPPORTED: 0,
        }
        return {int(k): v for k, v in values.items()}


MODELS: Mapping[str, GpuModel] = {
    "H100-SXM5-80GB": GpuModel(
        name="NVIDIA H100 80GB HBM3",
        compute_capability=(9, 0),
        total_mem=80 << 30,
        sm_count=132,
        clock_khz=1_980_000,
        mem_clock_khz=2_619_000,
        l2_bytes=50 << 20,
        shared_per_sm=228 << 10,
        shared_per_block_optin=227 << 10,
        pci_device_id=0x2330,
        pci_subsystem_id=0x16C1,
    ),
    "A100-SXM4-40GB": GpuModel(
        name="NVIDIA A100-SXM4-40GB",
        compute_capability=(8, 0),
        total_mem=40 << 30,
        sm_count=108,
        clock_khz=1_410_000,
        mem_clock_khz=1_215_000,
        l2_bytes=40 << 20,
        shared_per_sm=164 << 10,
        shared_per_block_optin=163 << 10,
        pci_device_id=0x20B0,
        pci_subsystem_id=0x134F,
    ),
}


@dataclass(frozen=True)
class LaunchRecord:
    """A launch as it reached its place in stream order; the sim ran no code for it."""

    function: str
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    params: bytes
    stream: SimStream | None


@dataclass
class _Mark:
    """One cuEventRecord: `done` is set when the stream reaches it, `ns` stamped just before."""

    done: threading.Event = field(default_factory=threading.Event)
    ns: int | None = None


class SimStream:
    """A stream: its operations run in order on its own worker thread."""

    def __init__(self, ctx: SimContext, flags: int) -> None:
        self.ctx = ctx
        self.flags = flags
        self._queue: queue.SimpleQueue[tuple[Callable[[], object], threading.Event] | None]
        self._queue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0
        self._stopped = False
        self._cancelled = False
        self._thread = threading.Thread(target=self._work, name="sim-stream", daemon=True)
        self._thread.start()

    @property
    def destroyed(self) -> bool:
        return self._stopped

    def enqueue(
        self, work: Callable[[], object], done: threading.Event | None = None
    ) -> threading.Event:
        """Queue `work` after everything queued before; `done` (returned) is set once it ran."""
        done = threading.Event() if done is None else done
        with self._lock:
            if self._stopped:
                raise InvalidHandle("stream was destroyed")
            self._pending += 1
            self._queue.put((work, done))
        return done

    def idle(self) -> bool:
        with self._lock:
            return self._pending == 0

    def drain(self) -> None:
        """Block until everything queued so far has run (or, once stopped, the worker ended)."""
        try:
            self.enqueue(_nothing).wait()
        except InvalidHandle:
            self._thread.join()

    def stop(self, cancel: bool) -> None:
        """Let the worker finish the queue and exit; `cancel` skips work not yet started."""
        with self._lock:
            self._cancelled |= cancel
            if not self._stopped:
                self._stopped = True
                self._queue.put(None)

    def join(self) -> None:
        self._thread.join()

    def _work(self) -> None:
        # Every operation is validated before it is queued, so running one cannot fail.
        while (item := self._queue.get()) is not None:
            work, done = item
            if not self._cancelled:
                work()
            with self._lock:
                self._pending -= 1
            done.set()
        self.ctx.forget(self)


def _nothing() -> None:
    """A marker operation: running it proves everything queued before it has run."""


class SimContext:
    """One zone's context: its allocations, streams, and the launches it has executed."""

    def __init__(self) -> None:
        self.alive = True
        self.lock = threading.Lock()
        self.legacy_lock = threading.Lock()  # legacy-stream work runs one call at a time
        self.streams: set[SimStream] = set()
        self.allocations: dict[int, mmap.mmap] = {}
        self.bases: list[int] = []  # sorted keys of `allocations`, for range lookups
        self.module_globals: set[int] = set()  # allocations that are modules' variables
        self.launches: list[LaunchRecord] = []

    def forget(self, stream: SimStream) -> None:
        with self.lock:
            self.streams.discard(stream)

    def live_streams(self, blocking_only: bool) -> list[SimStream]:
        with self.lock:
            return [s for s in self.streams if not (blocking_only and s.flags)]


class SimModule:
    """A loaded module image; `kernels` is what the image declares for the model's SM."""

    def __init__(
        self, ctx: SimContext, image: ModuleImage, variables: Mapping[str, DeviceGlobal]
    ) -> None:
        self.ctx = ctx
        self.image = image
        self._globals = MappingProxyType(dict(variables))
        self.loaded = True
        # kernel name -> dynamic shared memory limit set by cuFuncSetAttribute (ctx.lock)
        self.max_dynamic_shared: dict[str, int] = {}

    @property
    def kernels(self) -> Mapping[str, KernelInfo]:
        return self.image.kernels

    @property
    def globals(self) -> Mapping[str, DeviceGlobal]:
        return self._globals


class SimFunction:
    """A kernel of a loaded module."""

    def __init__(self, module: SimModule, info: KernelInfo) -> None:
        self.module = module
        self._info = info

    @property
    def info(self) -> KernelInfo:
        return self._info


class SimEvent:
    """An event; `mark` is its most recent record (None: never recorded)."""

    def __init__(self, ctx: SimContext, flags: int) -> None:
        self.ctx = ctx
        self.flags = flags
        self.mark: _Mark | None = None
        self.destroyed = False


def _charge(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def _copy(dst: mmap.mmap, dst_off: int, src: Buffer | mmap.mmap, src_off: int, size: int) -> None:
    for start in range(0, size, _CHUNK):
        n = min(_CHUNK, size - start)
        dst[dst_off + start : dst_off + start + n] = src[src_off + start : src_off + start + n]


def _copy_out(dst: memoryview, src: mmap.mmap, src_off: int, size: int) -> None:
    # Through a view: slicing the mmap itself would allocate a bytes object of the size.
    with memoryview(src) as view:
        dst[:size] = view[src_off : src_off + size]


def _fill(dst: mmap.mmap, dst_off: int, unit: bytes, size: int) -> None:
    block = memoryview(unit * (min(size, _CHUNK) // len(unit)))
    for start in range(0, size, _CHUNK):
        n = min(_CHUNK, size - start)
        dst[dst_off + start : dst_off + start + n] = block[:n]


class SimBackend:
    """GpuBackend on host memory. Stream-ordered operations run on per-stream worker threads;
    `stream=None` (the legacy default stream) first drains the context's blocking streams and
    then runs in the caller. A memcpy_dtoh on a stream blocks the caller until the stream has
    reached and executed the copy."""

    name = "sim"

    def __init__(self, model: str = "H100-SXM5-80GB", total_mem: int | None = None) -> None:
        if model not in MODELS:
            raise ValueError(f"unknown GPU model {model!r}; known: {', '.join(MODELS)}")
        self.model = MODELS[model]
        self._total = self.model.total_mem if total_mem is None else total_mem
        self._used = 0
        self._next_addr = ADDRESS_BASE
        self._lock = threading.Lock()
        # Immutable and asked for on hot paths (cuDriverGetVersion, attributes): built once.
        self._info = DeviceInfo(
            name=f"{self.model.name} (vgpu sim)",
            uuid=uuid.uuid5(_UUID_NAMESPACE, model).bytes,
            total_mem=self._total,
            compute_capability=self.model.compute_capability,
            driver_version=DRIVER_VERSION,
            attributes=MappingProxyType(self.model.attributes()),
        )

    # device

    def device_info(self) -> DeviceInfo:
        return self._info

    # contexts

    def create_context(self) -> SimContext:
        return SimContext()

    def destroy_context(self, ctx: Context) -> None:
        """Cancel queued work, stop the workers, and return the context's memory."""
        c = self._ctx(ctx)
        with c.lock:
            c.alive = False
            streams = list(c.streams)
        for s in streams:
            s.stop(cancel=True)
        for s in streams:
            s.join()
        with c.lock:
            freed = sum(_charge(len(slab)) for slab in c.allocations.values())
            c.allocations.clear()
            c.bases.clear()
            c.module_globals.clear()
        with self._lock:
            self._used -= freed

    def synchronize(self, ctx: Context) -> None:
        c = self._ctx(ctx)
        for s in c.live_streams(blocking_only=False):
            s.drain()

    # memory

    def mem_alloc(self, ctx: Context, size: int) -> int:
        c = self._ctx(ctx)
        if size <= 0:
            raise InvalidValue(f"allocation size {size}")
        return self._allocate(c, size)

    def _allocate(self, c: SimContext, size: int, init: bytes = b"") -> int:
        """Device memory of `size` bytes in c, starting with `init` (zeros after it)."""
        charge = _charge(size)
        with self._lock:
            if self._used + charge > self._total:
                raise OutOfMemory(f"{size} bytes requested, {self._total - self._used} free")
            self._used += charge
            addr = self._next_addr
            self._next_addr += charge  # never reused: a stale pointer cannot alias a new one
        try:
            slab = mmap.mmap(-1, size)  # anonymous: zero pages, touched lazily
        except OSError as exc:
            with self._lock:
                self._used -= charge
            raise OutOfMemory(f"host cannot back {size} bytes: {exc}") from exc
        slab[: len(init)] = init
        with c.lock:
            c.allocations[addr] = slab
            bisect.insort(c.bases, addr)
        return addr

    def mem_free(self, ctx: Context, ptr: int) -> None:
        """Like cuMemFree, waits for the context's outstanding work first. A module's variables
        are not allocations of the caller's: they go with the module."""
        c = self._ctx(ctx)
        with c.lock:
            if ptr not in c.allocations or ptr in c.module_globals:
                raise InvalidValue(f"{ptr:#x} is not the start of an allocation")
        self.synchronize(c)
        self._release(c, ptr)

    def mem_free_async(
        self, ctx: Context, ptr: int, stream: Stream | None, freed: Callable[[], None]
    ) -> None:
        """The slab is released when the stream reaches the free (queued work that still uses
        it runs first); later operations on the address are the caller's use-after-free."""
        c = self._ctx(ctx)
        with c.lock:
            if ptr not in c.allocations or ptr in c.module_globals:
                raise InvalidValue(f"{ptr:#x} is not the start of an allocation")

        def release() -> None:
            self._release(c, ptr)
            freed()

        self._submit(c, stream, release)

    def _release(self, c: SimContext, ptr: int) -> None:
        with c.lock:
            slab = c.allocations.pop(ptr, None)
            if slab is None:
                raise InvalidValue(f"{ptr:#x} was freed concurrently")
            c.bases.remove(ptr)
        with self._lock:
            self._used -= _charge(len(slab))

    def mem_info(self) -> tuple[int, int]:
        with self._lock:
            return self._total - self._used, self._total

    def memcpy_htod(self, ctx: Context, dst: int, data: Buffer, stream: Stream | None) -> None:
        """The source bytes are taken now, so the caller may reuse its buffer at once: the
        legacy stream copies them before returning, another stream keeps a copy until it runs."""
        view = memoryview(data).cast("B")

        def fill(into: memoryview) -> None:
            into[:] = view

        self.memcpy_htod_from(ctx, dst, len(view), fill, stream)

    def memcpy_htod_from(
        self, ctx: Context, dst: int, size: int, fill: Fill, stream: Stream | None
    ) -> None:
        """On the legacy stream the bytes are received straight into device memory once the
        earlier work has run; another stream receives them into a copy it keeps until it runs."""
        c = self._ctx(ctx)
        slab, off = self._span(c, dst, size)
        if stream is None:

            def receive() -> None:
                with memoryview(slab) as view:
                    fill(view[off : off + size])

            self._submit(c, None, receive)
        else:
            payload = bytearray(size)
            fill(memoryview(payload))
            self._submit(c, stream, lambda: _copy(slab, off, payload, 0, size))

    def memcpy_dtoh(
        self, ctx: Context, src: int, size: int, stream: Stream | None
    ) -> bytes | memoryview:
        """Blocks until the copy has executed in stream order, then returns its bytes. On the
        legacy stream that is a read-only view of the device memory (no copy: the caller sends
        it before it serves anything else); another stream's copy is taken in its order."""
        c = self._ctx(ctx)
        slab, off = self._span(c, src, size)
        if stream is None:
            self._submit(c, None, _nothing)
            return memoryview(slab).toreadonly()[off : off + size]
        result: list[bytes] = []
        self._submit(c, stream, lambda: result.append(slab[off : off + size])).wait()
        return result[0]

    def memcpy_htod_shared(
        self, ctx: Context, dst: int, src: memoryview, stream: Stream | None
    ) -> None:
        c = self._ctx(ctx)
        size = len(src)
        slab, off = self._span(c, dst, size)
        self._submit(c, stream, lambda: _copy(slab, off, src, 0, size))

    def memcpy_dtoh_into(
        self, ctx: Context, src: int, dst: memoryview, stream: Stream | None
    ) -> None:
        c = self._ctx(ctx)
        size = len(dst)
        slab, off = self._span(c, src, size)
        self._submit(c, stream, lambda: _copy_out(dst, slab, off, size))

    def memcpy_dtod(
        self, ctx: Context, dst: int, src: int, size: int, stream: Stream | None
    ) -> None:
        c = self._ctx(ctx)
        dslab, doff = self._span(c, dst, size)
        sslab, soff = self._span(c, src, size)
        self._submit(c, stream, lambda: _copy(dslab, doff, sslab, soff, size))

    def memset(
        self, ctx: Context, dst: int, value: int, elem_size: int, count: int, stream: Stream | None
    ) -> None:
        """cuMemsetD8/D16/D32: `count` elements of `elem_size` bytes, dst aligned to it."""
        c = self._ctx(ctx)
        if elem_size not in (1, 2, 4):
            raise InvalidValue(f"memset element size {elem_size}")
        if not 0 <= value < 1 << (8 * elem_size):
            raise InvalidValue(f"memset value {value} does not fit {elem_size} bytes")
        if count < 0 or dst % elem_size:
            raise InvalidValue(f"memset of {count} x {elem_size} bytes at {dst:#x}")
        size = count * elem_size
        slab, off = self._span(c, dst, size)
        unit = value.to_bytes(elem_size, "little")
        self._submit(c, stream, lambda: _fill(slab, off, unit, size))

    # modules and launches

    def module_load(self, ctx: Context, image: bytes) -> SimModule:
        c = self._ctx(ctx)
        try:
            parsed = parse_module_image(bytes(image), arch=self.model.arch)
        except NoCompatibleImageError as exc:
            raise NoBinaryForGpu(str(exc)) from exc
        except ModuleImageError as exc:
            raise InvalidImage(str(exc)) from exc
        variables: dict[str, DeviceGlobal] = {}
        try:
            for name, info in parsed.globals.items():
                variables[name] = DeviceGlobal(self._allocate(c, info.size, info.init), info.size)
        except OutOfMemory:
            for var in variables.values():
                self._release(c, var.address)
            raise
        with c.lock:
            c.module_globals.update(v.address for v in variables.values())
        return SimModule(c, parsed, variables)

    def module_unload(self, ctx: Context, module: Module) -> None:
        """The module's variables are freed once the work queued before the unload ran."""
        c = self._ctx(ctx)
        m = self._module(c, module)
        m.loaded = False
        if m.globals:
            self.synchronize(c)
        for var in m.globals.values():
            with c.lock:
                c.module_globals.discard(var.address)
            self._release(c, var.address)

    def module_function(self, ctx: Context, module: Module, name: str) -> SimFunction:
        m = self._module(self._ctx(ctx), module)
        info = m.kernels.get(name)
        if info is None:
            raise NotFound(f"module has no kernel {name!r}")
        return SimFunction(m, info)

    def function_set_max_dynamic_shared(self, ctx: Context, fn: Function, nbytes: int) -> None:
        """Raise (or lower) the kernel's dynamic shared memory limit, up to the model's opt-in
        maximum; it holds for every handle of the kernel in its module, as in CUDA."""
        f = self._function(self._ctx(ctx), fn)
        if not 0 <= nbytes <= self.model.shared_per_block_optin:
            raise InvalidValue(
                f"{nbytes} bytes of dynamic shared memory, opt-in limit "
                f"{self.model.shared_per_block_optin}"
            )
        with f.module.ctx.lock:
            f.module.max_dynamic_shared[f.info.name] = nbytes

    def launch(
        self,
        ctx: Context,
        fn: Function,
        grid: tuple[int, int, int],
        block: tuple[int, int, int],
        shared_mem: int,
        stream: Stream | None,
        params: bytes,
    ) -> None:
        """Validate as cuLaunchKernel does, then record the launch when its stream reaches it.

        The dynamic shared memory limit is the non-opt-in one unless cuFuncSetAttribute raised
        it for the kernel (the sim does not know the kernel's static shared memory)."""
        c = self._ctx(ctx)
        fn = self._function(c, fn)
        m = self.model
        with c.lock:
            shared_limit = fn.module.max_dynamic_shared.get(fn.info.name, m.shared_per_block)
        for what, dims, limits in (("grid", grid, m.max_grid), ("block", block, m.max_block)):
            if len(dims) != 3 or not all(
                1 <= d <= lim for d, lim in zip(dims, limits, strict=True)
            ):
                raise InvalidValue(f"{what} {dims} outside 1..{limits}")
        if block[0] * block[1] * block[2] > m.max_threads_per_block:
            raise InvalidValue(f"block {block} exceeds {m.max_threads_per_block} threads")
        if not 0 <= shared_mem <= shared_limit:
            raise InvalidValue(f"{shared_mem} bytes of shared memory, limit {shared_limit}")
        if len(params) != fn.info.param_bytes:
            raise InvalidValue(f"{len(params)} parameter bytes, kernel takes {fn.info.param_bytes}")
        s = None if stream is None else self._stream(c, stream)
        record = LaunchRecord(fn.info.name, grid, block, shared_mem, bytes(params), s)

        def executed() -> None:
            with c.lock:
                c.launches.append(record)

        self._submit(c, s, executed)

    # streams and events

    def stream_create(self, ctx: Context, flags: int) -> SimStream:
        c = self._ctx(ctx)
        if flags not in (0, CU_STREAM_NON_BLOCKING):
            raise InvalidValue(f"stream flags {flags:#x}")
        s = SimStream(c, flags)
        with c.lock:
            c.streams.add(s)
        return s

    def stream_destroy(self, ctx: Context, stream: Stream) -> None:
        """Returns at once, as cuStreamDestroy does; queued work still completes."""
        self._stream(self._ctx(ctx), stream).stop(cancel=False)

    def stream_synchronize(self, ctx: Context, stream: Stream | None) -> None:
        c = self._ctx(ctx)
        if stream is None:
            self._submit(c, None, _nothing)
        else:
            self._stream(c, stream).drain()

    def stream_query(self, ctx: Context, stream: Stream | None) -> bool:
        c = self._ctx(ctx)
        if stream is None:
            return all(s.idle() for s in c.live_streams(blocking_only=True))
        return self._stream(c, stream).idle()

    def stream_wait_event(self, ctx: Context, stream: Stream | None, event: Event) -> None:
        """Later work on `stream` waits for the event's latest record (none: no wait)."""
        c = self._ctx(ctx)
        mark = self._event(c, event).mark
        if mark is not None:
            self._submit(c, stream, mark.done.wait)

    def event_create(self, ctx: Context, flags: int) -> SimEvent:
        c = self._ctx(ctx)
        if flags & ~_EVENT_FLAGS:
            raise InvalidValue(f"event flags {flags:#x}")
        return SimEvent(c, flags)

    def event_record(self, ctx: Context, event: Event, stream: Stream | None) -> None:
        c = self._ctx(ctx)
        ev = self._event(c, event)
        mark = _Mark()

        def stamp() -> None:
            mark.ns = time.perf_counter_ns()

        self._submit(c, stream, stamp, mark.done)
        ev.mark = mark

    def event_synchronize(self, ctx: Context, event: Event) -> None:
        mark = self._event(self._ctx(ctx), event).mark
        if mark is not None:
            mark.done.wait()

    def event_query(self, ctx: Context, event: Event) -> bool:
        mark = self._event(self._ctx(ctx), event).mark
        return mark is None or mark.done.is_set()

    def event_elapsed_ms(self, ctx: Context, start: Event, end: Event) -> float:
        """As cuEventElapsedTime: INVALID_HANDLE for an event never recorded or created with
        DISABLE_TIMING, NOT_READY while either record is still pending."""
        c = self._ctx(ctx)
        stamps = []
        for ev in (self._event(c, start), self._event(c, end)):
            if ev.flags & CU_EVENT_DISABLE_TIMING or ev.mark is None:
                raise InvalidHandle("event was never recorded or does not record timing")
            stamps.append(ev.mark.ns if ev.mark.done.is_set() else None)
        if stamps[0] is None or stamps[1] is None:
            raise NotReady("event has not completed")
        return (stamps[1] - stamps[0]) / 1e6

    def event_destroy(self, ctx: Context, event: Event) -> None:
        self._event(self._ctx(ctx), event).destroyed = True

    # helpers

    def _ctx(self, ctx: Context) -> SimContext:
        if not isinstance(ctx, SimContext) or not ctx.alive:
            raise InvalidContext("context was destroyed or is not a sim context")
        return ctx

    def _stream(self, c: SimContext, stream: Stream) -> SimStream:
        if not isinstance(stream, SimStream) or stream.ctx is not c or stream.destroyed:
            raise InvalidHandle("not a live stream of this context")
        return stream

    def _event(self, c: SimContext, event: Event) -> SimEvent:
        if not isinstance(event, SimEvent) or event.ctx is not c or event.destroyed:
            raise InvalidHandle("not a live event of this context")
        return event

    def _function(self, c: SimContext, fn: Function) -> SimFunction:
        if not isinstance(fn, SimFunction) or fn.module.ctx is not c or not fn.module.loaded:
            raise InvalidHandle("not a function of a module loaded in this context")
        return fn

    def _module(self, c: SimContext, module: Module) -> SimModule:
        if not isinstance(module, SimModule) or module.ctx is not c or not module.loaded:
            raise InvalidHandle("not a module loaded in this context")
        return module

    def _span(self, c: SimContext, ptr: int, size: int) -> tuple[mmap.mmap, int]:
        """The allocation holding [ptr, ptr + size) and ptr's offset in it."""
        if size < 0:
            raise InvalidValue(f"negative size {size}")
        with c.lock:
            i = bisect.bisect_right(c.bases, ptr) - 1
            if i >= 0:
                base = c.bases[i]
                slab = c.allocations[base]
                if ptr + size <= base + len(slab):
                    return slab, ptr - base
        raise InvalidValue(f"[{ptr:#x}, +{size}) is not inside one allocation")

    def _submit(
        self,
        c: SimContext,
        stream: Stream | None,
        work: Callable[[], object],
        done: threading.Event | None = None,
    ) -> threading.Event:
        """Run `work` in `stream`'s order; the returned event is set once it has run."""
        if stream is not None:
            return self._stream(c, stream).enqueue(work, done)
        done = threading.Event() if done is None else done
        with c.legacy_lock:
            for s in c.live_streams(blocking_only=True):
                s.drain()
            work()
        done.set()
        return done
