"""The runtime half of the TensorRT double: ``Runtime`` -> ``ICudaEngine`` -> ``IExecutionContext``.

Only what Polygraphy's ``EngineFromBytes`` and ``TrtRunner`` call (read from polygraphy 0.53's
``backend/trt/loader.py``, ``runner.py`` and ``util.py``), with TensorRT 10's semantics as its API
documents them:

- the plan written by the builder double holds the parsed ONNX model and the optimization
  profiles; ``Runtime.deserialize_cuda_engine`` returns None (and logs an error) for bytes that are
  not such a plan, as TensorRT does for a foreign or corrupted plan;
- I/O tensors: the network's inputs, then its outputs, named and typed as in the ONNX graph;
  dynamic dimensions read as -1;
- ``set_input_shape`` returns False (and logs) for a shape of the wrong rank, a static dimension
  changed or a dynamic one outside the active profile's [min, max];
- ``execute_async_v3`` reads every input from the device address set for it (``set_tensor_address``;
  a missing address or shape makes it return False), computes the outputs, asks each output's
  ``IOutputAllocator`` for memory (``reallocate_output_async``), copies them there and reports their
  shapes (``notify_shape``).

What it cannot do is run TensorRT's kernels: the outputs are computed by ONNX Runtime on the parsed
ONNX model (the smlp plugin nodes through their model-local fallback functions). So a test through
this double checks everything around the engine (build, load, I/O binding, shapes, profiles,
copies, the validator's and the benchmark's use of the runner), never TensorRT's numerics.
``ICudaEngine.faults`` (test-only, not TensorRT API) plants a wrong engine output.
"""
from __future__ import annotations

import ctypes
import enum
import json
from typing import Callable

import numpy as np
import onnx

PLAN_MAGIC = b"smlp-trt-double-plan:"
EXPORTS = ("Runtime", "ICudaEngine", "IExecutionContext", "IOutputAllocator", "TensorIOMode",
           "ExecutionContextAllocationStrategy", "init_libnvinfer_plugins")

_ELEM = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.BFLOAT16: "BF16",
         onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT64", onnx.TensorProto.BOOL: "BOOL",
         onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8"}


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2

    def __str__(self) -> str:
        return f"TensorIOMode.{self.name}"


class ExecutionContextAllocationStrategy(enum.Enum):
    STATIC = 0
    ON_PROFILE_CHANGE = 1
    USER_MANAGED = 2


def init_libnvinfer_plugins(logger, namespace: str) -> bool:
    return True


class IOutputAllocator:
    """Base class of an output allocator (subclasses call ``IOutputAllocator.__init__(self)``)."""

    def __init__(self) -> None:
        self._trt_initialised = True

    def reallocate_output_async(self, tensor_name, memory, size, alignment, stream):
        return self.reallocate_output(tensor_name, memory, size, alignment)


def serialize_plan(network, config) -> bytes:
    """The builder double's plan: magic + plugin count, a JSON header (profiles, flags), the ONNX model."""
    profiles = [{k: [list(v) for v in shapes] for k, shapes in p.shapes.items()} for p in config.profiles]
    header = {"plugins": len(network.plugin_layers), "profiles": profiles,
              "flags": sorted(f.name for f in config.flags)}
    return (PLAN_MAGIC + str(len(network.plugin_layers)).encode() + b"\n" + json.dumps(header).encode() + b"\n"
            + network.model.SerializeToString())


class Runtime:
    def __init__(self, logger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, serialized_engine):
        data = bytes(serialized_engine)
        try:
            if not data.startswith(PLAN_MAGIC):
                raise ValueError("bad magic")
            _, header, model = data.split(b"\n", 2)
            info = json.loads(header)
            proto = onnx.load_from_string(model)
        except Exception as exc:  # noqa: BLE001 - whatever the bytes are, TensorRT answers None
            self.logger.log(1, f"IRuntime::deserializeCudaEngine: Error Code 1: Serialization (Serialization "
                               f"assertion failed: magic tag or plan data invalid ({type(exc).__name__}))")
            return None
        return ICudaEngine(proto, info, self.logger)


def _dims(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim)


class ICudaEngine:
    faults: dict[str, Callable[[np.ndarray], np.ndarray]] = {}  # test-only: output name -> corruption

    def __init__(self, model: onnx.ModelProto, info: dict, logger) -> None:
        import tensorrt as trt  # the double's module in sys.modules (its DataType enum)

        self._trt, self._model, self._logger = trt, model, logger
        self.profiles = [{k: tuple(tuple(s) for s in v) for k, v in p.items()} for p in info["profiles"]]
        inits = {t.name for t in model.graph.initializer}
        self._io: list[tuple[str, TensorIOMode, tuple, object]] = []
        for vi in model.graph.input:
            if vi.name not in inits:
                self._io.append((vi.name, TensorIOMode.INPUT, _dims(vi), self._dtype(vi)))
        for vi in model.graph.output:
            self._io.append((vi.name, TensorIOMode.OUTPUT, _dims(vi), self._dtype(vi)))
        self._by_name = {name: (mode, shape, dt) for name, mode, shape, dt in self._io}
        self._session = None

    def _dtype(self, vi):
        return getattr(self._trt.DataType, _ELEM[vi.type.tensor_type.elem_type])

    # -- engine inspection ------------------------------------------------------------------------
    @property
    def num_io_tensors(self) -> int:
        return len(self._io)

    @property
    def num_optimization_profiles(self) -> int:
        return max(1, len(self.profiles))

    def get_tensor_name(self, index: int) -> str:
        return self._io[index][0]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self._by_name[name][0] if name in self._by_name else TensorIOMode.NONE

    def get_tensor_shape(self, name: str):
        return self._trt.Dims(self._by_name[name][1])

    def get_tensor_dtype(self, name: str):
        return self._by_name[name][2]

    def get_tensor_format(self, name: str, profile_index: int = 0):
        return self._trt.TensorFormat.LINEAR

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def get_tensor_profile_shape(self, name: str, profile_index: int):
        lo, opt, hi = self.profiles[profile_index][name]
        return [self._trt.Dims(lo), self._trt.Dims(opt), self._trt.Dims(hi)]

    def create_execution_context(self, strategy=ExecutionContextAllocationStrategy.STATIC):
        return IExecutionContext(self)

    # -- what the GPU would do ----------------------------------------------------------------------
    def _compute(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._session is None:
            import onnxruntime as ort

            self._session = ort.InferenceSession(self._model.SerializeToString(), providers=["CPUExecutionProvider"])
        names = [o.name for o in self._model.graph.output]
        out = dict(zip(names, self._session.run(names, feeds)))
        for name, fault in self.faults.items():
            out[name] = np.ascontiguousarray(fault(out[name]), dtype=out[name].dtype)
        return out


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self._profile = 0
        self._shapes: dict[str, tuple] = {}
        self._addresses: dict[str, int] = {}
        self._allocators: dict[str, IOutputAllocator] = {}

    @property
    def active_optimization_profile(self) -> int:
        return self._profile

    def set_optimization_profile_async(self, profile_index: int, stream_handle: int) -> bool:
        if not 0 <= profile_index < self.engine.num_optimization_profiles:
            self.engine._logger.log(1, f"setOptimizationProfileAsync: profile index {profile_index} out of range")
            return False
        self._profile, self._shapes = profile_index, {}
        return True

    def _error(self, msg: str) -> bool:
        self.engine._logger.log(1, msg)
        return False

    def get_tensor_shape(self, name: str):
        mode, shape, _ = self.engine._by_name[name]
        if mode == TensorIOMode.INPUT:
            return self.engine._trt.Dims(self._shapes.get(name, shape))
        return self.engine._trt.Dims(shape)  # data-dependent here: known after execution (notify_shape)

    def set_input_shape(self, name: str, shape) -> bool:
        if self.engine.get_tensor_mode(name) != TensorIOMode.INPUT:
            return self._error(f"setInputShape: {name} is not an input tensor")
        shape, want = tuple(int(d) for d in shape), self.engine._by_name[name][1]
        if len(shape) != len(want) or any(w >= 0 and s != w for s, w in zip(shape, want)):
            return self._error(f"setInputShape: {name} shape {shape} does not match the engine's {want}")
        prof = self.engine.profiles[self._profile] if self.engine.profiles else {}
        if name in prof:
            lo, _, hi = prof[name]
            if any(not lo[i] <= shape[i] <= hi[i] for i in range(len(shape))):
                return self._error(f"IExecutionContext::setInputShape: Error Code 3: API Usage Error (Given invalid "
                                   f"shape {shape} for {name}: outside profile {self._profile} [{lo}, {hi}])")
        self._shapes[name] = shape
        return True

    def get_tensor_address(self, name: str) -> int:
        return self._addresses.get(name, 0)

    def set_tensor_address(self, name: str, memory: int) -> bool:
        if name not in self.engine._by_name:
            return self._error(f"setTensorAddress: unknown tensor {name}")
        self._addresses[name] = int(memory)
        return True

    def set_output_allocator(self, name: str, output_allocator) -> bool:
        if self.engine.get_tensor_mode(name) != TensorIOMode.OUTPUT:
            return self._error(f"setOutputAllocator: {name} is not an output tensor")
        if not isinstance(output_allocator, IOutputAllocator) or not getattr(output_allocator, "_trt_initialised", False):
            raise TypeError("set_output_allocator(): the allocator must be an IOutputAllocator whose __init__ "
                            "called IOutputAllocator.__init__(self)")
        self._allocators[name] = output_allocator
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        from . import bindings

        feeds = {}
        for name, mode, shape, dt in self.engine._io:
            if mode != TensorIOMode.INPUT:
                continue
            shp = self._shapes.get(name, shape)
            if any(d < 0 for d in shp):
                return self._error(f"enqueueV3: input {name} has no shape set (dynamic dims {shape})")
            ptr = self._addresses.get(name, 0)
            if not ptr:
                return self._error(f"enqueueV3: input {name} has no address set")
            np_dt = np.dtype(bindings.nptype(dt))
            nbytes = int(np.prod(shp, dtype=np.int64)) * np_dt.itemsize
            feeds[name] = np.frombuffer(ctypes.string_at(ptr, nbytes), dtype=np_dt).reshape(shp).copy()
        outputs = self.engine._compute(feeds)
        for name, mode, _, _ in self.engine._io:
            if mode != TensorIOMode.OUTPUT:
                continue
            arr = np.ascontiguousarray(outputs[name])
            alloc = self._allocators.get(name)
            if alloc is not None:
                ptr = alloc.reallocate_output_async(name, self._addresses.get(name, 0), max(arr.nbytes, 1), 256,
                                                    stream_handle)
                if not ptr:
                    return self._error(f"enqueueV3: the output allocator gave no memory for {name}")
                self._addresses[name] = int(ptr)
            elif not self._addresses.get(name):
                return self._error(f"enqueueV3: output {name} has neither an address nor an allocator")
            ctypes.memmove(self._addresses[name], arr.ctypes.data, arr.nbytes)
            if alloc is not None:
                alloc.notify_shape(name, self.engine._trt.Dims(arr.shape))
        return True
