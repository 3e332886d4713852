"""Plugin fields as TensorRT hands them over -> the Python values the node contract declares.

TensorRT's ONNX parser (onnx-tensorrt ``loadFields``) encodes an INT attribute as an int32[1] field,
a FLOAT as float32[1], a STRING as its bytes plus a NUL terminator counted in the field length, in the
plugin creator's field order. ``tensorrt.plugin`` then builds the plugin's attributes from each field
by its annotation: ``field.data.astype(dtype)`` for ``numpy.typing.NDArray[dtype]``,
``field.data.tobytes().decode()`` for ``str``, ``annotation(field.data)`` otherwise.
"""
from __future__ import annotations

import functools
import inspect
import re
from typing import Callable

import numpy as np
import numpy.typing as npt

from smlp_export.export.contract import PluginContract

# How each contract field type is declared to tensorrt.plugin. TensorRT builds the plugin from fields
# with ``annotation(field.data)``, and field.data is a 1-element array for an ONNX INT / FLOAT attribute
# (the parser encodes INT as int32[1], FLOAT as float32[1]): ``int(array([k]))`` raises with
# numpy >= 2.4. Declared as 1-D numpy arrays, the data arrive as ``field.data.astype(dtype)`` and
# :func:`decode_field` turns them into Python scalars. Strings arrive as ``bytes.decode()`` of the
# field, which the parser NUL-terminates (the terminator is counted in the field length).
FIELD_ANNOTATIONS: dict[type, object] = {int: npt.NDArray[np.int32], float: npt.NDArray[np.float32], str: str}

# A field value we accept: printable ASCII, no NUL (after dropping the parser's one terminator).
_FIELD_STR = re.compile(r"[ -~]*")


def decode_field(c: PluginContract, name: str, value: object) -> object:
    """A plugin field as TensorRT hands it over -> the Python value the contract declares.

    int / float: a 1-element numpy array (what the ONNX parser sends) or a Python scalar; str: the text,
    with the parser's single trailing NUL removed. Anything else is a ValueError naming the field.
    """
    typ = c.attributes[name]
    if typ is str:
        if isinstance(value, bytes):
            value = value.decode("utf-8", errors="replace")
        if not isinstance(value, str):
            raise ValueError(f"{c.op_type}.{name}: expected a string field, got {type(value).__name__}")
        text = value[:-1] if value.endswith("\0") else value
        if not _FIELD_STR.fullmatch(text):
            raise ValueError(f"{c.op_type}.{name}: malformed string field {value!r}")
        return text
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"{c.op_type}.{name}: expected one {typ.__name__}, got {value.size} values")
        value = value.reshape(-1)[0].item()
    if typ is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise ValueError(f"{c.op_type}.{name}: expected {typ.__name__}, got {value!r}")


def decoding(fn: Callable, c: PluginContract) -> Callable:
    """``fn`` called with decoded fields; same signature as ``fn`` (tensorrt.plugin inspects it)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = sig.bind(*args, **kwargs)
        for name in c.attributes:
            if name in bound.arguments:
                bound.arguments[name] = decode_field(c, name, bound.arguments[name])
        return fn(*bound.args, **bound.kwargs)

    return wrapper
