"""libvgpu's build: from scratch, warning-free, byte-for-byte reproducible, a libcuda.so.1 that
exports the driver API it implements and nothing else."""

import subprocess
import sys
from pathlib import Path

from libvgpu.build import LIBRARY, ROOT, SONAME, build
from tests.libvgpu.conftest import bulk_wire_check

# The CUDA driver API entry points libvgpu implements, by the names cuda.h 13 calls them and
# the legacy/per-thread-stream names the real libcuda also exports with the same ABI.
EXPORTS = {
    # init, versions, errors, entry points and cudart's private tables
    "cuInit", "cuDriverGetVersion", "cuGetErrorName", "cuGetErrorString", "cuGetProcAddress",
    "cuGetProcAddress_v2", "cuGetExportTable",
    # devices (answered from the snapshot)
    "cuDeviceGet", "cuDeviceGetCount", "cuDeviceGetName", "cuDeviceGetUuid",
    "cuDeviceGetUuid_v2", "cuDeviceTotalMem_v2", "cuDeviceGetAttribute",
    # contexts
    "cuDevicePrimaryCtxRetain", "cuDevicePrimaryCtxRelease", "cuDevicePrimaryCtxRelease_v2",
    "cuDevicePrimaryCtxGetState", "cuCtxCreate", "cuCtxCreate_v2", "cuCtxCreate_v4",
    "cuCtxDestroy", "cuCtxDestroy_v2", "cuCtxGetCurrent", "cuCtxSetCurrent", "cuCtxPushCurrent",
    "cuCtxPushCurrent_v2", "cuCtxPopCurrent", "cuCtxPopCurrent_v2", "cuCtxGetDevice",
    "cuCtxGetDevice_v2", "cuCtxSynchronize", "cuCtxSynchronize_v2",
    # memory
    "cuMemGetInfo_v2", "cuMemAlloc_v2", "cuMemFree_v2", "cuMemGetAddressRange_v2",
    "cuMemcpyHtoD_v2", "cuMemcpyHtoD_v2_ptds", "cuMemcpyDtoH_v2", "cuMemcpyDtoH_v2_ptds",
    "cuMemcpyDtoD_v2", "cuMemcpyDtoD_v2_ptds", "cuMemcpyHtoDAsync_v2",
    "cuMemcpyHtoDAsync_v2_ptsz", "cuMemcpyDtoHAsync_v2", "cuMemcpyDtoHAsync_v2_ptsz",
    "cuMemcpyDtoDAsync_v2", "cuMemcpyDtoDAsync_v2_ptsz", "cuMemsetD8_v2", "cuMemsetD8_v2_ptds",
    "cuMemsetD32_v2", "cuMemsetD32_v2_ptds", "cuMemsetD8Async", "cuMemsetD8Async_ptsz",
    "cuMemsetD32Async", "cuMemsetD32Async_ptsz", "cuPointerGetAttribute",
    "cuPointerGetAttributes", "cuMemAllocAsync", "cuMemAllocAsync_ptsz",
    "cuMemAllocFromPoolAsync", "cuMemAllocFromPoolAsync_ptsz", "cuMemFreeAsync",
    "cuMemFreeAsync_ptsz", "cuDeviceGetDefaultMemPool", "cuDeviceGetMemPool",
    "cuDeviceSetMemPool", "cuMemPoolGetAttribute", "cuMemPoolSetAttribute", "cuMemPoolTrimTo",
    "cuMemcpy", "cuMemcpy_ptds", "cuMemcpyAsync", "cuMemcpyAsync_ptsz",
    "cuMemAllocHost_v2", "cuMemHostAlloc", "cuMemFreeHost", "cuMemHostGetFlags",
    "cuMemHostRegister", "cuMemHostRegister_v2", "cuMemHostUnregister",
    # modules and launches
    "cuModuleLoad", "cuModuleLoadData", "cuModuleLoadFatBinary", "cuModuleUnload",
    "cuModuleGetFunction", "cuModuleGetGlobal_v2", "cuFuncGetAttribute", "cuFuncGetParamInfo",
    "cuFuncSetAttribute", "cuLaunchKernelEx", "cuLaunchKernelEx_ptsz",
    "cuOccupancyMaxActiveBlocksPerMultiprocessor",
    "cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags", "cuOccupancyMaxPotentialBlockSize",
    "cuOccupancyMaxPotentialBlockSizeWithFlags", "cuLaunchKernel", "cuLaunchKernel_ptsz",
    "cuLibraryLoadData", "cuLibraryUnload",
    "cuLibraryGetKernel", "cuLibraryGetModule", "cuLibraryGetGlobal", "cuKernelGetFunction",
    "cuKernelGetAttribute", "cuKernelSetAttribute",
    # streams and events
    "cuStreamCreate", "cuStreamCreateWithPriority", "cuCtxGetStreamPriorityRange",
    "cuStreamGetPriority", "cuStreamGetPriority_ptsz", "cuStreamGetFlags",
    "cuStreamGetFlags_ptsz", "cuStreamGetCtx", "cuStreamGetCtx_ptsz", "cuStreamDestroy",
    "cuStreamDestroy_v2", "cuStreamSynchronize",
    "cuStreamSynchronize_ptsz", "cuStreamQuery", "cuStreamQuery_ptsz", "cuStreamWaitEvent",
    "cuStreamWaitEvent_ptsz", "cuStreamAddCallback", "cuStreamAddCallback_ptsz",
    "cuLaunchHostFunc", "cuLaunchHostFunc_ptsz", "cuEventCreate", "cuEventRecord",
    "cuEventRecord_ptsz",
    "cuEventSynchronize", "cuEventQuery", "cuEventElapsedTime", "cuEventElapsedTime_v2",
    "cuEventDestroy", "cuEventDestroy_v2",
    # stream capture (never: no graphs) and the loading mode
    "cuStreamIsCapturing", "cuStreamIsCapturing_ptsz", "cuStreamGetCaptureInfo_v2",
    "cuStreamGetCaptureInfo_v2_ptsz", "cuStreamGetCaptureInfo_v3",
    "cuStreamGetCaptureInfo_v3_ptsz", "cuThreadExchangeStreamCaptureMode",
    "cuModuleGetLoadingMode",
    # features not offered to zones (unsupported.c): present, answering NOT_SUPPORTED
    "cuMemAddressReserve", "cuMemAddressFree", "cuMemCreate", "cuMemRelease", "cuMemMap",
    "cuMemUnmap", "cuMemSetAccess", "cuMemGetAllocationGranularity",
    "cuMemGetAllocationPropertiesFromHandle", "cuMemRetainAllocationHandle",
    "cuMemExportToShareableHandle", "cuMemImportFromShareableHandle", "cuStreamWriteValue32_v2",
    "cuStreamWriteValue32_v2_ptsz", "cuMulticastCreate", "cuMulticastAddDevice",
    "cuMulticastBindMem", "cuMulticastUnbind", "cuGreenCtxCreate", "cuGreenCtxDestroy",
    "cuGreenCtxStreamCreate", "cuCtxFromGreenCtx", "cuDeviceGetDevResource",
    "cuDevSmResourceSplitByCount", "cuDevResourceGenerateDesc", "cuLogsRegisterCallback",
    "cuLogsUnregisterCallback",
    # inter-process sharing (gpu-proxy refuses it)
    "cuIpcGetMemHandle", "cuIpcOpenMemHandle", "cuIpcOpenMemHandle_v2", "cuIpcCloseMemHandle",
    "cuIpcGetEventHandle", "cuIpcOpenEventHandle",
}  # fmt: skip


def tool(*args: str) -> str:
    return subprocess.run(args, capture_output=True, text=True, check=True).stdout


def test_builds_from_scratch_reproducibly_and_without_warnings(tmp_path: Path) -> None:
    first, second = build(tmp_path / "a"), build(tmp_path / "b")
    assert first.compiler_output == "" and second.compiler_output == ""
    assert first.library.read_bytes() == second.library.read_bytes()
    out = first.library.parent
    assert (out / "libcuda.so.1").readlink() == Path(LIBRARY)
    assert (out / "libcuda.so").readlink() == Path(SONAME)
    assert f"Library soname: [{SONAME}]" in tool("readelf", "-d", str(first.library))


def test_exports_the_driver_api_and_nothing_else(tmp_path: Path) -> None:
    library = build(tmp_path).library
    defined = set(tool("nm", "-D", "--defined-only", "--format=just-symbols", str(library)).split())
    assert defined == EXPORTS, (
        f"missing: {sorted(EXPORTS - defined)}, unexpected: {sorted(defined - EXPORTS)}"
    )
    # Everything else the library needs comes from libc (and the dynamic loader, for TLS);
    # weak references (w) are the C runtime's optional hooks.
    needed = [
        line.split() for line in tool("nm", "-D", "--undefined-only", str(library)).splitlines()
    ]
    foreign = [name for kind, name in needed if kind == "U" and "@GLIBC_" not in name]
    assert not foreign, foreign


def test_command_line_builds_into_the_given_directory(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "libvgpu.build", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "libcuda.so.1").resolve() == (tmp_path / LIBRARY).resolve()
    assert proc.stderr == ""


def test_gathered_heads_match_the_generated_marshalling(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(bulk_wire_check(tmp_path))], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
