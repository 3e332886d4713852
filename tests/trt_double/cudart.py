"""A double of the CUDA runtime's C API as Polygraphy calls it (``polygraphy/cuda/cuda.py``: its
``Cuda`` wrapper calls ``cudaMalloc``, ``cudaFree``, ``cudaMemcpy[Async]``, ``cudaStreamCreate``,
``cudaStreamSynchronize`` and ``cudaStreamDestroy`` through ``ctypes.CDLL("libcudart.so")``).

"Device" memory is host memory owned by this object; the calls return CUDA's status codes: 0 on
success, ``cudaErrorInvalidValue`` (1) for a copy that touches device memory outside an
allocation (a freed buffer, a wrong pointer or size) or a free of an unknown pointer, so a runner
that copies from the wrong place fails here as it would on a GPU. Streams are handles; copies are
synchronous (correct for any stream order). :func:`install` makes it Polygraphy's global wrapper.
"""
from __future__ import annotations

import ctypes
import itertools

ERROR_INVALID_VALUE = 1
HOST_TO_DEVICE, DEVICE_TO_HOST, DEVICE_TO_DEVICE = 1, 2, 3


class CudaRuntime:
    def __init__(self) -> None:
        self.allocations: dict[int, ctypes.Array] = {}
        self.streams: set[int] = set()
        self._stream_ids = itertools.count(0x5000)
        self.copies = 0

    @staticmethod
    def _out(pptr) -> ctypes.c_void_p:
        return pptr._obj  # ctypes.byref(c_void_p) -> the c_void_p it points at

    def _inside(self, ptr: int, nbytes: int) -> bool:
        for base, buf in self.allocations.items():
            if base <= ptr and ptr + nbytes <= base + ctypes.sizeof(buf):
                return True
        return False

    # -- the C API ----------------------------------------------------------------------------------
    def cudaMalloc(self, pptr, nbytes) -> int:  # noqa: N802 (CUDA's names)
        buf = ctypes.create_string_buffer(max(int(nbytes.value), 1))
        addr = ctypes.addressof(buf)
        self.allocations[addr] = buf
        self._out(pptr).value = addr
        return 0

    def cudaFree(self, ptr) -> int:  # noqa: N802
        if ptr.value is None:  # cudaFree(nullptr) is a no-op
            return 0
        return 0 if self.allocations.pop(ptr.value, None) is not None else ERROR_INVALID_VALUE

    def cudaMemcpy(self, dst, src, nbytes, kind) -> int:  # noqa: N802
        n, k = int(nbytes.value), int(kind.value)
        if n == 0:
            return 0
        if (k in (HOST_TO_DEVICE, DEVICE_TO_DEVICE) and not self._inside(dst.value, n)) or \
                (k in (DEVICE_TO_HOST, DEVICE_TO_DEVICE) and not self._inside(src.value, n)):
            return ERROR_INVALID_VALUE
        ctypes.memmove(dst.value, src.value, n)
        self.copies += 1
        return 0

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream) -> int:  # noqa: N802
        if stream.value is not None and stream.value not in self.streams:
            return ERROR_INVALID_VALUE
        return self.cudaMemcpy(dst, src, nbytes, kind)

    def cudaStreamCreate(self, pptr) -> int:  # noqa: N802
        handle = next(self._stream_ids)
        self.streams.add(handle)
        self._out(pptr).value = handle
        return 0

    def cudaStreamSynchronize(self, stream) -> int:  # noqa: N802
        return 0 if stream.value is None or stream.value in self.streams else ERROR_INVALID_VALUE

    def cudaStreamDestroy(self, stream) -> int:  # noqa: N802
        if stream.value not in self.streams:
            return ERROR_INVALID_VALUE
        self.streams.discard(stream.value)
        return 0


def install(monkeypatch) -> CudaRuntime:
    """Polygraphy's global CUDA wrapper over a fresh :class:`CudaRuntime`; its TensorRT logger is
    reset too (it subclasses the ``tensorrt.ILogger`` of whichever module was current)."""
    from polygraphy.backend.trt import util as trt_util
    from polygraphy.cuda import cuda

    rt = CudaRuntime()
    wrapper = object.__new__(cuda.Cuda)  # Cuda() would dlopen libcudart; the handle is all it keeps
    wrapper.handle = rt
    monkeypatch.setattr(cuda, "G_CUDA", wrapper)
    monkeypatch.setattr(trt_util, "TRT_LOGGER", None)
    return rt
