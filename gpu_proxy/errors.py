"""CUresult codes gpu-proxy produces itself, and the exceptions that carry them.

Checks deep in the proxy (handle tables, pointer ranges, quotas) raise these; dispatch turns
`.result` into the reply status, so a zone sees the same CUresult a real driver would give.
"""

from __future__ import annotations

CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_OUT_OF_MEMORY = 2
CUDA_ERROR_INVALID_HANDLE = 400


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


class InvalidHandle(CudaError):
    """A handle that is not one of this zone's live handles of the expected kind
    (CUDA_ERROR_INVALID_HANDLE)."""

    result = CUDA_ERROR_INVALID_HANDLE
