"""Blocked-causal spatial products: skip the zero upper triangle of ``tril(W)[:T, :T] @ Z``.

Every spatial projection (dense gMLP blocks and the deterministic spatial MoE) is a MatMul whose
left operand is causal, ``A = tril(W[..., :T, :T])`` [..., T, T], so half of a dense product
multiplies zeros. ``BlockCausalMatMul(n, block)`` (an onnxscript rewriter rule) rewrites, in the top-level graph,

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
import onnx_ir as ir
from onnxscript.rewriter import pattern

from .optimize import _GraphRule, is_zero_start_slice, top_level, tril_k_is_zero
from .weights import ir_recipe


def is_causal(a: ir.Value) -> bool:
    """``a`` is a lower-triangular [..., T, T] matrix by construction (see the module doc)."""
    p = a.producer()
    if p is not None and p.op_type == "Trilu" and p.domain in ("", "ai.onnx"):
        upper = p.attributes.get("upper")
        return upper is not None and upper.value == 0 and tril_k_is_zero(p.inputs[1] if len(p.inputs) > 1 else None)
    x = a
    while x.producer() is not None and is_zero_start_slice(x.producer()):
        x = x.producer().inputs[0]
    if x is a or not x.is_initializer() or x.const_value is None:
        return False
    dims = list(x.shape) if x.shape is not None else []
    if len(dims) < 2 or dims[-1] != dims[-2]:
        return False
    r = ir_recipe(x.const_value)
    if r is not None:  # a low-memory export's placeholder: causal iff its recipe ends in a tril
        return bool(r.ops) and r.ops[-1] == ("tril",)
    return not np.any(np.triu(x.const_value.numpy().astype(np.float32), 1))


class BlockCausalMatMul(_GraphRule):
    """``MatMul(A, Z)`` with A causal -> ``Concat_i MatMul(A[iC:(i+1)C, :(i+1)C], Z[:(i+1)C])``."""

    def __init__(self, n: int, block: int) -> None:
        self.n, self.block = n, block
        self.made: set[str] = set()  # the row-block products this rule wrote: never split again
        super().__init__(name=f"BlockCausalMatMul{block}")

    def pattern(self, op, a, z):
        return op.MatMul(a, z, _outputs=["y"])

    def check(self, context, a, z, y):
        self.graph = context.graph_or_function
        return top_level(context) and y.name not in self.made and is_causal(a)

    def rewrite(self, op, a, z, y):
        parts = []
        for i in range(-(-self.n // self.block)):
            lo, hi = i * self.block, (i + 1) * self.block
            a_i = op.Slice(a, self.ints(op, f"causal_blk.{lo}_0", [lo, 0]), self.ints(op, f"causal_blk.{hi}_{hi}", [hi, hi]),
                           self.ints(op, "causal_blk.axes_rc", [-2, -1]), _outputs=[f"{y.name}.blk{i}.a"])
            z_i = op.Slice(z, self.ints(op, "causal_blk.0", [0]), self.ints(op, f"causal_blk.{hi}", [hi]),
                           self.ints(op, "causal_blk.axis_r", [-2]), _outputs=[f"{y.name}.blk{i}.z"])
            parts.append(op.MatMul(a_i, z_i, _outputs=[f"{y.name}.blk{i}"]))
            self.made.add(f"{y.name}.blk{i}")
        return op.Concat(*parts, axis=-2)

    def ints(self, op, name: str, values: list[int]) -> ir.Value:
        return self.reuse(op, lambda: ir.tensor(np.asarray(values, dtype=np.int64), name=name), name)


def causal_rules(n: int, block: int) -> pattern.RewriteRuleSet | None:
    """The blocked-causal rule for max_seq_len ``n`` and ``block`` rows per block; None when
    there is nothing to do (``block`` <= 0 or >= n)."""
    if block <= 0 or block >= n:
        return None
    return pattern.RewriteRuleSet([BlockCausalMatMul.rule(n, block)])


def default_block(n: int) -> int:
    """The export's block size for max_seq_len ``n``: 256 rows for n >= 1024, else 0 (dense).

    Measured side by side (benchmarks/cpu_real_shapes.py, d=1024, n=1024, C=256, ONNX Runtime
    CPU, 1 thread, a heavily loaded 2-core machine): p50 dense / blocked = 1.10x at B=1, T=1024
    and 1.18x at B=8, T=512, in line with the FLOP count (at T=1024 the spatial products are ~1/4
    of a block's multiply-adds and C=256 skips 3/8 of them); 0.93-1.02x at T <= 512, B=1, where
    the saving is <= 3.5 % and at T <= C the executed products are identical (differences there
    are the machine's noise). Below n = 1024 the triangle is too small to pay for the extra nodes."""
    return 256 if n >= 1024 else 0


__all__ = ["BlockCausalMatMul", "causal_rules", "default_block", "is_causal"]
