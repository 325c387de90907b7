"""CUresult codes gpu-proxy produces itself, and the exceptions that carry them.

Checks deep in the proxy (handle tables, pointer ranges, quotas) raise these; dispatch turns
`.result` into the reply status, so a zone sees the same CUresult a real driver would give.
"""

from __future__ import annotations

CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_INVALID_DEVICE = 101
CUDA_ERROR_INVALID_IMAGE = 200
CUDA_ERROR_INVALID_CONTEXT = 201
CUDA_ERROR_NO_BINARY_FOR_GPU = 209
CUDA_ERROR_INVALID_HANDLE = 400
CUDA_ERROR_NOT_FOUND = 500
CUDA_ERROR_NOT_READY = 600
CUDA_ERROR_NOT_PERMITTED = 800
CUDA_ERROR_NOT_SUPPORTED = 801
CUDA_ERROR_UNKNOWN = 999


class CudaError(Exception):
    """A failure a zone's call should see as the CUresult `result`."""

    result: int


class InvalidValue(CudaError):
    """A pointer, length or size the zone may not use (CUDA_ERROR_INVALID_VALUE)."""

    result = CUDA_ERROR_INVALID_VALUE


class OutOfMemory(CudaError):
    """The zone's quota, the device, or the zone's id space is exhausted
    (CUDA_ERROR_OUT_OF_MEMORY)."""

    result = CUDA_ERROR_OUT_OF_MEMORY


class InvalidDevice(CudaError):
    """A device ordinal the zone does not have: each zone sees one GPU, device 0
    (CUDA_ERROR_INVALID_DEVICE)."""

    result = CUDA_ERROR_INVALID_DEVICE


class InvalidHandle(CudaError):
    """A handle that is not one of this zone's live handles of the expected kind
    (CUDA_ERROR_INVALID_HANDLE)."""

    result = CUDA_ERROR_INVALID_HANDLE


class InvalidImage(CudaError):
    """A module image that is malformed or unsupported (CUDA_ERROR_INVALID_IMAGE)."""

    result = CUDA_ERROR_INVALID_IMAGE


class InvalidContext(CudaError):
    """A context that was destroyed or is not one of this backend's (CUDA_ERROR_INVALID_CONTEXT)."""

    result = CUDA_ERROR_INVALID_CONTEXT


class NoBinaryForGpu(CudaError):
    """A well-formed module with no code the device can run (CUDA_ERROR_NO_BINARY_FOR_GPU)."""

    result = CUDA_ERROR_NO_BINARY_FOR_GPU


class NotFound(CudaError):
    """A named symbol (e.g. a kernel) that the module does not have (CUDA_ERROR_NOT_FOUND)."""

    result = CUDA_ERROR_NOT_FOUND


class NotReady(CudaError):
    """Work that a query or timing needs has not completed yet (CUDA_ERROR_NOT_READY)."""

    result = CUDA_ERROR_NOT_READY


class NotSupported(CudaError):
    """A feature this channel cannot offer, e.g. shared host memory on a grant link
    (CUDA_ERROR_NOT_SUPPORTED)."""

    result = CUDA_ERROR_NOT_SUPPORTED


class DriverError(CudaError):
    """A CUresult from the real driver that has no class of its own above; `result` is the
    driver's code, so the zone sees exactly what the driver said."""

    def __init__(self, result: int, message: str) -> None:
        super().__init__(message)
        self.result = result
