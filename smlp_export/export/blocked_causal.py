"""Blocked-causal spatial products: skip the zero upper triangle of ``tril(W)[:T, :T] @ Z``.

Every spatial projection (dense gMLP blocks and the deterministic spatial MoE) is a MatMul whose
left operand is causal, ``A = tril(W[..., :T, :T])`` [..., T, T], so half of a dense product
multiplies zeros. ``block_causal_matmuls(model, n, block)`` rewrites, in the top-level graph,

    Y = MatMul(A, Z)                     A [..., T, T] lower-triangular, Z [..., T, X]
into
    Y = Concat_i MatMul(A[..., iC:(i+1)C, :(i+1)C], Z[..., :(i+1)C, :])   along axis -2

for i = 0 .. ceil(n / C) - 1, C = ``block``. Row block i only needs the columns up to its own
last row: the terms left out are exactly the zeros above the diagonal, so the result is the same
sum (in another order). T stays dynamic: ONNX ``Slice`` clamps its ends to the actual size, and a
row block that starts at or beyond T is an empty [..., 0, X] product. The work of a full row
range drops from T^2 to T^2 (K + 1) / (2K) for K = T / C blocks (K = 4: 62.5 %).

What is causal is recognised structurally, never assumed: ``Trilu(upper=0, k=0)`` output (the
``portable`` target), or a chain of zero-start, unit-step ``Slice``s of an initializer whose last
two axes are lower-triangular (the ``ort`` target after ``optimize.py`` pre-masked the weights).
Whether this pays is measured in ``benchmarks/cpu_real_shapes.py`` (docs/benchmarks.md).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .optimize import _attr, _Graph, _is


def _is_causal(g: _Graph, name: str) -> bool:
    """``name`` is a lower-triangular [..., T, T] matrix by construction (see the module doc)."""
    p = g.producer.get(name)
    if _is(p, "Trilu"):
        k_zero = len(p.input) < 2 or not p.input[1] or (g.const(p.input[1]) is not None and int(g.const(p.input[1]).reshape(-1)[0]) == 0)
        return _attr(p, "upper", 1) == 0 and k_zero
    x = name
    while _is(g.producer.get(x), "Slice"):
        s = g.producer[x]
        starts = g.const(s.input[1])
        steps = g.const(s.input[4]) if len(s.input) > 4 and s.input[4] else None
        if starts is None or np.any(starts != 0) or (steps is not None and np.any(steps != 1)):
            return False
        x = s.input[0]
    if x == name or x not in g.init:
        return False
    from .weights import recipe_of

    r = recipe_of(g.init[x])
    if r is not None:  # a low-memory export's placeholder: causal iff its recipe ends in a tril
        dims = list(g.init[x].dims)
        return bool(r.ops) and r.ops[-1] == ("tril",) and len(dims) >= 2 and dims[-1] == dims[-2]
    w = numpy_helper.to_array(g.init[x])
    return w.ndim >= 2 and w.shape[-1] == w.shape[-2] and not np.any(np.triu(w.astype(np.float32), 1))


def block_causal_matmuls(model: onnx.ModelProto, n: int, block: int) -> int:
    """Rewrite every top-level MatMul with a causal left operand (in place); returns how many.

    ``n``: max_seq_len (T <= n), ``block``: rows per block C. Nothing happens when C >= n."""
    if block <= 0 or block >= n:
        return 0
    g = _Graph(model.graph)
    k_blocks = -(-n // block)
    consts: dict[str, onnx.TensorProto] = {}

    def const(name: str, values: list[int]) -> str:
        if name not in consts:
            consts[name] = numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)
        return name

    out_nodes: list[onnx.NodeProto] = []
    done = 0
    for node in model.graph.node:
        if not (_is(node, "MatMul") and _is_causal(g, node.input[0])):
            out_nodes.append(node)
            continue
        a, z, y = node.input[0], node.input[1], node.output[0]
        parts = []
        for i in range(k_blocks):
            lo, hi = i * block, (i + 1) * block
            a_i, z_i, y_i = f"{y}.blk{i}.a", f"{y}.blk{i}.z", f"{y}.blk{i}"
            out_nodes += [
                helper.make_node("Slice", [a, const(f"causal_blk.{lo}_0", [lo, 0]),
                                           const(f"causal_blk.{hi}_{hi}", [hi, hi]),
                                           const("causal_blk.axes_rc", [-2, -1])], [a_i]),
                helper.make_node("Slice", [z, const("causal_blk.0", [0]), const(f"causal_blk.{hi}", [hi]),
                                           const("causal_blk.axis_r", [-2])], [z_i]),
                helper.make_node("MatMul", [a_i, z_i], [y_i]),
            ]
            parts.append(y_i)
        out_nodes.append(helper.make_node("Concat", parts, [y], axis=-2))
        done += 1
    if done:
        del model.graph.node[:]
        model.graph.node.extend(out_nodes)
        model.graph.initializer.extend(sorted(consts.values(), key=lambda t: t.name))
    return done


def default_block(n: int) -> int:
    """The export's block size for max_seq_len ``n``: 256 rows for n >= 1024, else 0 (dense).

    Measured side by side (benchmarks/cpu_real_shapes.py, d=1024, n=1024, C=256, ONNX Runtime
    CPU, 1 thread, a heavily loaded 2-core machine): p50 dense / blocked = 1.10x at B=1, T=1024
    and 1.18x at B=8, T=512, in line with the FLOP count (at T=1024 the spatial products are ~1/4
    of a block's multiply-adds and C=256 skips 3/8 of them); 0.93-1.02x at T <= 512, B=1, where
    the saving is <= 3.5 % and at T <= C the executed products are identical (differences there
    are the machine's noise). Below n = 1024 the triangle is too small to pay for the extra nodes."""
    return 256 if n >= 1024 else 0


__all__ = ["block_causal_matmuls", "default_block"]
