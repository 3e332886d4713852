"""A test double of TensorRT for the plugin tests (no TensorRT, no GPU on CI).

``bindings``: the compiled part of the ``tensorrt`` module; ``plugin_layer``: our re-implementation
of the pure-Python ``tensorrt.plugin`` semantics; ``builder``: what the ONNX parser and the builder
do with a plugin node; ``engine``: the runtime, engine and execution context Polygraphy's
``EngineFromBytes`` / ``TrtRunner`` drive (outputs computed by ONNX Runtime on the parsed graph);
``cudart``: the CUDA runtime C API under Polygraphy's CUDA wrapper (``cudart.install``). :func:`install` puts a fresh ``tensorrt`` + ``tensorrt.plugin`` into
``sys.modules`` (through pytest's monkeypatch, so each test starts from an empty registry).

With ``SMLP_TRT_PLUGIN_SRC`` pointing at a directory holding NVIDIA's own
``tensorrt/plugin/*.py`` (from a TensorRT wheel or NVIDIA/TensorRT's
``python/packaging/bindings_wheel``; never copied into this repository), :func:`install` loads THAT
layer over the bindings double instead of ours: the same tests then check our double against the
real Python layer.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from . import bindings

HERE = Path(__file__).resolve().parent
REAL_SRC_ENV = "SMLP_TRT_PLUGIN_SRC"


def real_plugin_src() -> Path | None:
    src = os.environ.get(REAL_SRC_ENV)
    if not src:
        return None
    p = Path(src)
    p = p / "tensorrt" / "plugin" if (p / "tensorrt" / "plugin" / "__init__.py").is_file() else p
    if not (p / "_lib.py").is_file():
        raise FileNotFoundError(f"{REAL_SRC_ENV}={src}: no tensorrt/plugin/_lib.py there")
    return p


def install(monkeypatch, version: str = bindings.__version__):
    """Fresh ``tensorrt`` (bindings double) and ``tensorrt.plugin`` modules; returns ``tensorrt``."""
    trt = bindings.make_module(version)
    for name in [m for m in sys.modules if m == "tensorrt" or m.startswith("tensorrt.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    src = real_plugin_src()
    if src is None:
        spec = importlib.util.spec_from_file_location("tensorrt.plugin", HERE / "plugin_layer.py")
    else:
        spec = importlib.util.spec_from_file_location("tensorrt.plugin", src / "__init__.py",
                                                      submodule_search_locations=[str(src)])
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", mod)
    trt.plugin = mod
    spec.loader.exec_module(mod)
    if src is not None:  # the real layer imported its submodules: let monkeypatch remove them afterwards
        for name in [m for m in sys.modules if m.startswith("tensorrt.plugin.")]:
            monkeypatch.setitem(sys.modules, name, sys.modules.pop(name))
    return trt
