"""The CUDA backend's driver-free parts: how it fails without a driver, how CUresults become
exceptions, the launch parameter layout, and that it implements the backend interface.
Real-GPU behaviour is tested in tests/gpu."""

import ctypes
import inspect
from typing import Any

import pytest
from cuda.bindings import driver
from cuda.pathfinder import DynamicLibNotFoundError

from gpu_proxy.backends import cuda
from gpu_proxy.backends.base import GpuBackend
from gpu_proxy.backends.cuda import (
    BackendUnavailable,
    CudaBackend,
    driver_error,
    pack_launch_params,
    query_result,
    result_name,
)
from gpu_proxy.errors import (
    CudaError,
    DriverError,
    InvalidHandle,
    InvalidValue,
    NotFound,
    NotReady,
    OutOfMemory,
)
from gpu_proxy.modules import KernelInfo, ParamInfo

R = driver.CUresult


def _driver_loadable() -> bool:
    try:
        driver.cuDriverGetVersion()
    except DynamicLibNotFoundError:
        return False
    return True


@pytest.mark.skipif(_driver_loadable(), reason="this machine has libcuda")
def test_without_a_driver_construction_says_libcuda_is_missing() -> None:
    with pytest.raises(BackendUnavailable, match="libcuda could not be loaded") as info:
        CudaBackend()
    assert "sim backend" in str(info.value)


def test_a_missing_library_is_reported_on_any_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_lib(flags: int) -> tuple[Any, ...]:
        raise DynamicLibNotFoundError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr(driver, "cuInit", no_lib)
    with pytest.raises(BackendUnavailable, match=r"libcuda could not be loaded.*libcuda\.so\.1"):
        CudaBackend()


def test_cuinit_failure_names_the_cuResult(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "cuInit", lambda flags: (R.CUDA_ERROR_NO_DEVICE,))
    with pytest.raises(
        BackendUnavailable, match=r"cuInit failed with CUDA_ERROR_NO_DEVICE \(100\)"
    ):
        CudaBackend()


def test_a_bad_device_ordinal_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(driver, "cuInit", lambda flags: (R.CUDA_SUCCESS,))
    monkeypatch.setattr(driver, "cuDeviceGet", lambda n: (R.CUDA_ERROR_INVALID_DEVICE, None))
    with pytest.raises(BackendUnavailable, match=r"device 3: .*CUDA_ERROR_INVALID_DEVICE"):
        CudaBackend(3)


@pytest.mark.parametrize(
    ("result", "cls"),
    [
        (R.CUDA_ERROR_INVALID_VALUE, InvalidValue),
        (R.CUDA_ERROR_OUT_OF_MEMORY, OutOfMemory),
        (R.CUDA_ERROR_INVALID_HANDLE, InvalidHandle),
        (R.CUDA_ERROR_NOT_FOUND, NotFound),
        (R.CUDA_ERROR_NOT_READY, NotReady),
        (R.CUDA_ERROR_ILLEGAL_ADDRESS, DriverError),
        (R.CUDA_ERROR_LAUNCH_FAILED, DriverError),
        (R.CUDA_ERROR_UNKNOWN, DriverError),
    ],
)
def test_every_failure_carries_its_cuResult(result: Any, cls: type[CudaError]) -> None:
    exc = driver_error(int(result), "cuSomething")
    assert type(exc) is cls
    assert exc.result == int(result)
    assert str(exc) == f"cuSomething failed: {result.name} ({int(result)})"


def test_driver_errors_keep_their_own_code() -> None:
    illegal = driver_error(int(R.CUDA_ERROR_ILLEGAL_ADDRESS), "cuCtxSynchronize")
    launch = driver_error(int(R.CUDA_ERROR_LAUNCH_FAILED), "cuCtxSynchronize")
    assert (illegal.result, launch.result) == (700, 719)


def test_an_unknown_code_still_maps() -> None:
    assert result_name(99999) == "CUresult 99999"
    exc = driver_error(99999, "cuNew")
    assert isinstance(exc, DriverError)
    assert exc.result == 99999


def test_not_ready_from_a_query_is_false_not_an_error() -> None:
    assert query_result(int(R.CUDA_SUCCESS), "cuStreamQuery") is True
    assert query_result(int(R.CUDA_ERROR_NOT_READY), "cuStreamQuery") is False
    with pytest.raises(InvalidHandle, match="cuEventQuery failed: CUDA_ERROR_INVALID_HANDLE"):
        query_result(int(R.CUDA_ERROR_INVALID_HANDLE), "cuEventQuery")


def test_launch_params_use_the_extra_buffer_layout() -> None:
    params = bytes(range(28))
    packed = pack_launch_params(params)
    extra = ctypes.cast(packed.address, ctypes.POINTER(ctypes.c_void_p))
    # [CU_LAUNCH_PARAM_BUFFER_POINTER, &buffer, CU_LAUNCH_PARAM_BUFFER_SIZE, &size, END]
    assert (extra[0], extra[2], extra[4]) == (1, 2, None)
    assert ctypes.string_at(extra[1], len(params)) == params
    assert ctypes.c_size_t.from_address(extra[3]).value == len(params)
    assert packed.address == ctypes.addressof(packed.extra)


def test_launch_params_own_a_copy() -> None:
    params = bytearray(b"\x01" * 8)
    packed = pack_launch_params(bytes(params))
    params[:] = b"\x02" * 8
    assert ctypes.string_at(ctypes.addressof(packed.buffer), 8) == b"\x01" * 8


def test_cuda_backend_implements_the_backend_interface() -> None:
    # mypy checks this assignment structurally; the loop checks the signatures at run time.
    backend: GpuBackend = CudaBackend.__new__(CudaBackend)
    assert backend.name == "cuda"
    wanted = {
        name: inspect.signature(member)
        for name, member in vars(GpuBackend).items()
        if callable(member) and not name.startswith("_")
    }
    assert wanted
    for name, signature in wanted.items():
        assert inspect.signature(getattr(CudaBackend, name)).parameters.keys() == (
            signature.parameters.keys()
        ), name


def test_objects_of_another_backend_are_rejected() -> None:
    with pytest.raises(InvalidHandle, match="not a CudaStream"):
        cuda._stream(object())


def _offline_backend(monkeypatch: pytest.MonkeyPatch) -> CudaBackend:
    """A backend whose context push/pop succeed, so each operation reaches its driver call."""
    monkeypatch.setattr(driver, "cuCtxPushCurrent", lambda h: (R.CUDA_SUCCESS,))
    monkeypatch.setattr(driver, "cuCtxPopCurrent", lambda: (R.CUDA_SUCCESS, driver.CUcontext()))
    backend = CudaBackend.__new__(CudaBackend)
    backend._device = driver.CUdevice(0)
    backend._primary = driver.CUcontext()
    return backend


@pytest.mark.skipif(_driver_loadable(), reason="would call a real driver with null handles")
def test_every_driver_call_accepts_its_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    # Without libcuda a call whose arguments cuda-bindings accepted fails loading the library;
    # a wrong argument type fails earlier with TypeError or OverflowError.
    backend = _offline_backend(monkeypatch)
    ctx = cuda.CudaContext(driver.CUcontext())
    st = cuda.CudaStream(driver.CUstream())
    ev = cuda.CudaEvent(driver.CUevent())
    info = KernelInfo("k", (ParamInfo(0, 0, 4),), 4)
    mod = cuda.CudaModule(driver.CUmodule(), {"k": info}, {})
    fn = cuda.CudaFunction(driver.CUfunction(), info)
    calls: list[tuple[str, tuple[Any, ...]]] = [
        ("create_context", ()),
        ("destroy_context", (ctx,)),
        ("synchronize", (ctx,)),
        ("mem_alloc", (ctx, 16)),
        ("mem_free", (ctx, 5)),
        ("mem_free_async", (ctx, 5, st, lambda: None)),
        ("mem_info", ()),
        ("memcpy_htod", (ctx, 5, b"ab", None)),
        ("memcpy_htod", (ctx, 5, memoryview(b"ab"), st)),
        ("memcpy_dtoh", (ctx, 5, 2, None)),
        ("memcpy_dtoh", (ctx, 5, 2, st)),
        ("memcpy_dtod", (ctx, 5, 6, 2, None)),
        ("memcpy_dtod", (ctx, 5, 6, 2, st)),
        ("memset", (ctx, 5, 0x1FF, 1, 2, None)),
        ("memset", (ctx, 5, 0x1FFFF, 2, 2, st)),
        ("memset", (ctx, 5, 0xFFFFFFFF, 4, 2, st)),
        ("module_unload", (ctx, mod)),
        ("module_function", (ctx, mod, "k")),
        ("function_set_max_dynamic_shared", (ctx, fn, 100 << 10)),
        ("launch", (ctx, fn, (1, 1, 1), (1, 1, 1), 0, None, b"abcd")),
        ("launch", (ctx, fn, (1, 1, 1), (1, 1, 1), 0, st, b"abcd")),
        ("stream_create", (ctx, 1)),
        ("stream_destroy", (ctx, st)),
        ("stream_synchronize", (ctx, None)),
        ("stream_query", (ctx, st)),
        ("stream_wait_event", (ctx, None, ev)),
        ("event_create", (ctx, 0)),
        ("event_record", (ctx, ev, st)),
        ("event_synchronize", (ctx, ev)),
        ("event_query", (ctx, ev)),
        ("event_elapsed_ms", (ctx, ev, ev)),
        ("event_destroy", (ctx, ev)),
    ]
    for name, args in calls:
        ctx.live = True
        with pytest.raises(DynamicLibNotFoundError):
            getattr(backend, name)(*args)
