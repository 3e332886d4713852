"""Exact graph rewrites for the ``ort`` target: less work per run on ONNX Runtime's CPU provider.

The dynamo exporter writes what PyTorch does, every run: mask the causal spatial weights
(``Slice -> Trilu``), GELU as five elementwise nodes (``Div -> Erf -> Add -> Mul -> Mul``; ONNX
Runtime's own Gelu fusion does not match this operand order, measured: the Erf nodes stay), and
``z.chunk(2)`` as a ``Split`` that copies the GELU output in two. ``optimize_ort`` rewrites, in the
top-level graph, each of these to what gives the same numbers with less work:

- ``Trilu(Slice*(W))`` with every Slice starting at 0 (step 1) and ``upper=0, k=0`` ->
  ``Slice*(tril(W))``: the mask is applied once, at export, to a new constant (the top-left
  corner of a lower-triangular matrix is the lower triangle of the corner);
- the erf-GELU pattern -> one ``com.microsoft.Gelu`` (same formula, 0.5 x (1 + erf(x / sqrt 2)));
- ``Split(Gelu(MatMul(x, W) + b), 2, last axis)`` -> two ``MatMul(x, W_i) + b_i -> Gelu`` on the
  column halves of W (split at export: GELU is elementwise, so no copy at run time).

Every rewrite checks its pattern fully (constant values, single consumers) and leaves anything
else alone; names of new values are derived from the old ones, so the result is deterministic.
Used by ``graph.build_onnx`` for the ``ort`` target only (``portable`` stays default-domain; the
``tensorrt`` target is left as the exporter wrote it).
"""
from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .weights import derive, is_lazy

MSFT_DOMAIN = "com.microsoft"


class _Graph:
    """Producer / consumer / constant look-ups over one GraphProto's top level."""

    def __init__(self, g: onnx.GraphProto) -> None:
        self.g = g
        self.init = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for o in n.output:
                self.producer[o] = n
            for i in _inputs_deep(n):
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in g.output}

    def const(self, name: str) -> np.ndarray | None:
        if name in self.init:
            # a placeholder weight (weights.py) has no data yet: never a known constant
            return None if is_lazy(self.init[name]) else numpy_helper.to_array(self.init[name])
        p = self.producer.get(name)
        if p is not None and p.op_type == "Constant" and p.domain in ("", "ai.onnx"):
            for a in p.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None

    def only_consumer(self, name: str) -> onnx.NodeProto | None:
        """The single node reading ``name`` (None if several, none, or it is a graph output)."""
        c = self.consumers.get(name, [])
        return c[0] if len(c) == 1 and name not in self.outputs else None


def _inputs_deep(n: onnx.NodeProto):
    """A node's inputs plus every outer-scope name its subgraphs read."""
    yield from (i for i in n.input if i)
    for a in n.attribute:
        for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for m in sg.node:
                yield from _inputs_deep(m)


def _attr(n: onnx.NodeProto, name: str, default=None):
    for a in n.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _key(n: onnx.NodeProto) -> str:
    """A node's identity across passes (protobuf wrappers have no stable id): its first output."""
    return n.output[0]


def _same(a: onnx.NodeProto | None, b: onnx.NodeProto | None) -> bool:
    return a is not None and b is not None and _key(a) == _key(b)


def _is(n: onnx.NodeProto | None, op_type: str) -> bool:
    return n is not None and n.op_type == op_type and n.domain in ("", "ai.onnx")


def _scalar(g: _Graph, name: str, value: float) -> bool:
    """``name`` is a one-element constant equal to ``value`` up to its dtype's rounding."""
    c = g.const(name)
    if c is None or c.size != 1 or c.dtype.kind not in "fiu":
        return False
    if c.dtype.kind in "iu":
        return float(c.reshape(-1)[0]) == value
    rel = float(np.finfo(c.dtype).eps)  # fp16 sqrt(2) is 1.414 (half an ulp off), fp32 1.4142135
    return math.isclose(float(c.reshape(-1)[0]), value, rel_tol=rel)


def _other(n: onnx.NodeProto, name: str) -> str:
    """The other input of a binary node one of whose inputs is ``name``."""
    return n.input[1] if n.input[0] == name else n.input[0]


def _premask_trilu(g: _Graph, new_init: list[onnx.TensorProto]) -> tuple[set[str], dict[str, str], dict[str, onnx.NodeProto]]:
    drop: set[str] = set()
    rename: dict[str, str] = {}
    replace: dict[str, onnx.NodeProto] = {}
    for n in g.g.node:
        if not _is(n, "Trilu") or _attr(n, "upper", 1) != 0:
            continue
        if len(n.input) > 1 and n.input[1] and not _scalar(g, n.input[1], 0.0):
            continue
        chain, x = [], n.input[0]
        while _is(g.producer.get(x), "Slice"):
            s = g.producer[x]
            starts = g.const(s.input[1])
            steps = g.const(s.input[4]) if len(s.input) > 4 and s.input[4] else None
            if starts is None or np.any(starts != 0) or (steps is not None and np.any(steps != 1)):
                break
            if g.only_consumer(x) is None:
                break
            chain.append(s)
            x = s.input[0]
        if not chain or x not in g.init:
            continue
        if len(g.init[x].dims) < 2:
            continue
        masked = derive(g.init[x], f"{x}.tril", "tril")
        if masked.name not in {t.name for t in new_init}:
            new_init.append(masked)
        first = chain[-1]
        new_first = onnx.NodeProto()
        new_first.CopyFrom(first)
        new_first.input[0] = masked.name
        replace[_key(first)] = new_first
        drop.add(_key(n))
        rename[n.output[0]] = n.input[0]
    return drop, rename, replace


def _match_erf_gelu(g: _Graph, erf: onnx.NodeProto):
    """(x, nodes to drop, last node) of 0.5 * (1 + erf(x / sqrt2)) * x in any operand order."""
    scale = g.producer.get(erf.input[0])
    if _is(scale, "Div") and _scalar(g, scale.input[1], math.sqrt(2)):
        x = scale.input[0]
    elif _is(scale, "Mul") and (_scalar(g, scale.input[1], 1 / math.sqrt(2)) or _scalar(g, scale.input[0], 1 / math.sqrt(2))):
        x = scale.input[0] if _scalar(g, scale.input[1], 1 / math.sqrt(2)) else scale.input[1]
    else:
        return None
    if not _same(g.only_consumer(scale.output[0]), erf):
        return None
    add = g.only_consumer(erf.output[0])
    if not _is(add, "Add") or not _scalar(g, _other(add, erf.output[0]), 1.0):
        return None
    m1 = g.only_consumer(add.output[0])
    if not _is(m1, "Mul"):
        return None
    m2 = g.only_consumer(m1.output[0])
    if _scalar(g, _other(m1, add.output[0]), 0.5):  # (0.5 * (1 + erf)) * x
        if not _is(m2, "Mul") or _other(m2, m1.output[0]) != x:
            return None
    elif _other(m1, add.output[0]) == x:  # (x * (1 + erf)) * 0.5
        if not _is(m2, "Mul") or not _scalar(g, _other(m2, m1.output[0]), 0.5):
            return None
    else:
        return None
    return x, [scale, erf, add, m1], m2


def _fuse_gelu(g: _Graph) -> tuple[set[str], dict[str, onnx.NodeProto]]:
    drop: set[str] = set()
    replace: dict[str, onnx.NodeProto] = {}
    for n in g.g.node:
        if not _is(n, "Erf"):
            continue
        m = _match_erf_gelu(g, n)
        if m is None:
            continue
        x, dead, last = m
        drop |= {_key(d) for d in dead}
        replace[_key(last)] = helper.make_node("Gelu", [x], list(last.output), domain=MSFT_DOMAIN)
    return drop, replace


def _split_weights(g: _Graph, new_init: list[onnx.TensorProto]) -> tuple[set[str], dict[str, list[onnx.NodeProto]]]:
    """Split(Gelu(MatMul(x, W) + b)) into two half-width chains (W, b split at export)."""
    drop: set[str] = set()
    expand: dict[str, list[onnx.NodeProto]] = {}
    for n in g.g.node:
        if not _is(n, "Split") or len(n.output) != 2 or (len(n.input) > 1 and n.input[1]):
            continue
        gelu = g.producer.get(n.input[0])
        if gelu is None or (gelu.domain, gelu.op_type) != (MSFT_DOMAIN, "Gelu") or not _same(g.only_consumer(gelu.output[0]), n):
            continue
        add = g.producer.get(gelu.input[0])
        if not _is(add, "Add") or not _same(g.only_consumer(add.output[0]), gelu):
            continue
        mm_out = next((i for i in add.input if _is(g.producer.get(i), "MatMul")), None)
        if mm_out is None or not _same(g.only_consumer(mm_out), add):
            continue
        b_name, mm = _other(add, mm_out), g.producer[mm_out]
        if b_name not in g.init or mm.input[1] not in g.init:
            continue
        w, b = g.init[mm.input[1]], g.init[b_name]  # dims only: either may be a placeholder
        out = w.dims[-1] if w.dims else 0
        if len(w.dims) != 2 or list(b.dims) != [out] or out % 2 or _attr(n, "axis", 0) not in (-1, 2):
            continue
        h = out // 2
        nodes = []
        for i, z in enumerate(n.output):
            wi = derive(w, f"{mm.input[1]}.part{i}", "slice", 1, i * h, (i + 1) * h)
            bi = derive(b, f"{b_name}.part{i}", "slice", 0, i * h, (i + 1) * h)
            # the exporter shares identical initializers between blocks: add each split once
            new_init += [t for t in (wi, bi) if t.name not in {u.name for u in new_init}]
            nodes += [helper.make_node("MatMul", [mm.input[0], wi.name], [f"{z}.mm"]),
                      helper.make_node("Add", [f"{z}.mm", bi.name], [f"{z}.pre"]),
                      helper.make_node("Gelu", [f"{z}.pre"], [z], domain=MSFT_DOMAIN)]
        drop |= {_key(mm), _key(add), _key(gelu)}
        expand[_key(n)] = nodes
    return drop, expand


def _apply(model: onnx.ModelProto, drop: set[str], replace: dict[str, list[onnx.NodeProto]],
           rename: dict[str, str], new_init: list[onnx.TensorProto]) -> None:
    g = model.graph
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        if _key(n) in drop:
            continue
        nodes += replace.get(_key(n), [n])
    del g.node[:]
    g.node.extend(nodes)
    g.initializer.extend(new_init)
    if rename:
        def resolve(x: str) -> str:
            while x in rename:
                x = rename[x]
            return x

        def fix(graph: onnx.GraphProto) -> None:
            for n in graph.node:
                for k, i in enumerate(n.input):
                    n.input[k] = resolve(i)
                for a in n.attribute:
                    for sg in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                        fix(sg)
        fix(g)
    # drop initializers nothing reads any more, and value_info of values no longer produced
    used = {i for n in g.node for i in _inputs_deep(n)} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    produced = {o for n in g.node for o in n.output} | {i.name for i in g.input}
    vi = [v for v in g.value_info if v.name in produced]
    del g.value_info[:]
    g.value_info.extend(vi)
    if any(n.domain == MSFT_DOMAIN for n in g.node) and not any(o.domain == MSFT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MSFT_DOMAIN, 1))


def optimize_ort(model: onnx.ModelProto) -> dict[str, int]:
    """Rewrite ``model`` in place (see the module docstring); returns how many of each were done."""
    new_init: list[onnx.TensorProto] = []
    drop, rename, replace = _premask_trilu(_Graph(model.graph), new_init)
    _apply(model, drop, {k: [v] for k, v in replace.items()}, rename, new_init)
    counts = {"trilu_premasked": len(drop)}
    drop, replace = _fuse_gelu(_Graph(model.graph))
    _apply(model, drop, {k: [v] for k, v in replace.items()}, {}, [])
    counts["gelu_fused"] = len(replace)
    new_init = []
    drop, expand = _split_weights(_Graph(model.graph), new_init)
    _apply(model, drop, expand, {}, new_init)
    counts["split_weights"] = len(expand)
    return counts
