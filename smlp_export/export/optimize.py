"""Exact graph rewrites for the ``ort`` target, as onnxscript rewriter rules on onnx_ir.

The dynamo exporter writes what PyTorch does, every run: mask the causal spatial weights
(``Slice -> Trilu``), GELU as five elementwise nodes (``Div -> Erf -> Add -> Mul -> Mul``; ONNX
Runtime's own Gelu fusion does not match this operand order, measured: the Erf nodes stay), and
``z.chunk(2)`` as a ``Split`` that copies the GELU output in two. ``ORT_RULES`` rewrites, in the
top-level graph, each of these to what gives the same numbers with less work:

- ``Trilu(Slice*(W))`` with every Slice starting at 0 (step 1) and ``upper=0, k=0`` ->
  ``Slice*(tril(W))`` (``PremaskedWeight``): the mask is applied once, at export, to a new
  initializer (``weights.ir_derive``: a placeholder's recipe grows by a ``tril`` step); the
  top-left corner of a lower-triangular matrix is the lower triangle of the corner;
- the erf-GELU pattern -> one ``com.microsoft.Gelu``: onnxscript's own rules
  (``onnxscript.rewriter.ort_fusions.erfgelu`` / ``gelu``, every operand order), and
  ``HalfPrecisionErfGelu`` for fp16 / bf16 graphs, whose rounded constants those never match;
- ``Split(Gelu(MatMul(x, W) + b), 2, last axis)`` -> two ``MatMul(x, W_i) + b_i -> Gelu`` on the
  column halves of W (``SplitGeluWeights``; split at export: GELU is elementwise, so no copy at
  run time).

Every rule checks its pattern fully (constant values, single consumers: the matcher refuses a
match whose inner values are read elsewhere) and fires in the top-level graph only, as the
exporter's graph is written there (``top_level``). Names of new values are derived from the old
ones, so the result is deterministic.
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import erfgelu, gelu

from .weights import ir_derive, ir_recipe

MSFT_DOMAIN = "com.microsoft"


def top_level(context) -> bool:
    """The match lies in the model's top-level graph (not a Loop / If body)."""
    return context.graph_or_function is context.model.graph


def const(v: ir.Value | None) -> np.ndarray | None:
    """The value of a constant ``v`` (initializer or Constant node), None if unknown or a
    placeholder weight (``weights.py``: it has no data yet)."""
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None or ir_recipe(t) is not None else t.numpy()


def is_zero_start_slice(node: ir.Node) -> bool:
    """``node`` is a Slice whose starts are all 0 and steps (if given) all 1."""
    if node.op_type != "Slice" or node.domain not in ("", "ai.onnx"):
        return False
    starts = const(node.inputs[1])
    steps = const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    return starts is not None and not np.any(starts != 0) and (steps is None or not np.any(steps != 1))


def tril_k_is_zero(k: ir.Value | None) -> bool:
    """Trilu's optional ``k`` input is absent or a constant 0."""
    if k is None:
        return True
    c = const(k)
    return c is not None and c.size == 1 and float(c.reshape(-1)[0]) == 0.0


class _GraphRule(pattern.RewriteRuleClassBase):
    """A rule that may reuse the initializers of the graph it rewrites (``self.graph``)."""

    graph: ir.Graph

    def reuse(self, op, tensor_fn, name: str) -> ir.Value:
        """The initializer ``name``: the graph's own if it has one (the exporter shares identical
        weights between blocks) or this replacement made it already, else a new one made from
        ``tensor_fn()``."""
        if name in self.graph.initializers:
            return self.graph.initializers[name]
        made = self.__dict__.setdefault("_made", {})
        if made.get("op") is not op:  # a new replacement: op is its TapeBuilder
            made.clear()
            made["op"] = op
        if name not in made:
            made[name] = op.initializer(tensor_fn(), name)
        return made[name]


class PremaskedWeight(_GraphRule):
    """``Trilu(Slice^depth(W), upper=0, k=0)`` of an initializer W, every Slice zero-start and
    unit-step -> ``Slice^depth(W.tril)``, the same Slices (``depth`` = 1, 2, 3: the exporter slices
    each of the last two axes, one Slice each or one for both)."""

    def __init__(self, depth: int) -> None:
        self.depth = depth
        super().__init__(name=f"PremaskedWeight{depth}")

    def pattern(self, op, w):
        x = w
        for i in range(self.depth):
            x = op.Slice(x, _allow_other_inputs=True, _outputs=[f"s{i}"])
        return op.Trilu(x, _allow_other_inputs=True, upper=0, _outputs=["masked"])

    def check(self, context, w, masked, **slices):
        self.graph = context.graph_or_function
        trilu = masked.producer()
        return (top_level(context) and w.is_initializer() and w.const_value is not None and w.shape is not None
                and len(w.shape) >= 2 and tril_k_is_zero(trilu.inputs[1] if len(trilu.inputs) > 1 else None)
                and all(is_zero_start_slice(slices[f"s{i}"].producer()) for i in range(self.depth)))

    def rewrite(self, op, w, masked, **slices):
        name = f"{w.name}.tril"
        x = self.reuse(op, lambda: ir_derive(w.const_value, name, "tril"), name)
        for i in range(self.depth):
            s = slices[f"s{i}"]
            x = op.Slice(x, *s.producer().inputs[1:], _outputs=[s.name] if i < self.depth - 1 else 1)
            x.type, x.shape = s.type, s.shape
        return x


class SplitGeluWeights(_GraphRule):
    """``Split(Gelu(MatMul(x, W) + b), 2, last axis)`` -> two half-width chains (W, b split at export)."""

    def pattern(self, op, x, w, b, axis):
        z = op.Gelu(op.Add(op.MatMul(x, w), b), _domain=MSFT_DOMAIN)
        return op.Split(z, axis=axis, _outputs=["z0", "z1"])

    def check(self, context, x, w, b, axis, z0, z1, **_):
        self.graph = context.graph_or_function
        if not (top_level(context) and w.is_initializer() and b.is_initializer()):
            return False
        out = w.shape[-1] if w.shape is not None and len(w.shape) == 2 else None
        # dims only: either may be a placeholder
        return (isinstance(out, int) and out % 2 == 0 and b.shape is not None and list(b.shape) == [out]
                and axis.value in (-1, 2))

    def rewrite(self, op, x, w, b, axis, z0, z1, **_):
        h = w.shape[-1] // 2
        outs = []
        for i, z in enumerate((z0, z1)):
            wn, bn = f"{w.name}.part{i}", f"{b.name}.part{i}"
            wi = self.reuse(op, lambda: ir_derive(w.const_value, wn, "slice", 1, i * h, (i + 1) * h), wn)
            bi = self.reuse(op, lambda: ir_derive(b.const_value, bn, "slice", 0, i * h, (i + 1) * h), bn)
            mm = op.MatMul(x, wi, _outputs=[f"{z.name}.mm"])
            pre = op.Add(mm, bi, _outputs=[f"{z.name}.pre"])
            outs.append(op.Gelu(pre, _domain=MSFT_DOMAIN))
        return outs


class HalfPrecisionErfGelu(pattern.RewriteRuleClassBase):
    """The erf GELU in float16 / bfloat16 -> ``com.microsoft.Gelu``. onnxscript's rules match
    their constants to a relative 1e-5, which a half-precision sqrt(2) (1.414, half an ulp off)
    never meets; here each constant matches up to its own dtype's rounding. ``form`` 0:
    ``x * ((erf(x / sqrt2) + 1) * 0.5)`` (what the exporter writes), 1: ``(x * (erf + 1)) * 0.5``."""

    def __init__(self, form: int) -> None:
        self.form = form
        super().__init__(name=f"HalfPrecisionErfGelu{form}")

    def pattern(self, op, x, sqrt2, one, half):
        e = op.Add(op.Erf(op.Div(x, sqrt2)), one)
        return op.Mul(x, op.Mul(e, half)) if self.form == 0 else op.Mul(op.Mul(x, e), half)

    def check(self, context, x, sqrt2, one, half, **_):
        if not top_level(context) or x.dtype not in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16):
            return False
        eps = float(np.finfo(np.float16).eps) if x.dtype == ir.DataType.FLOAT16 else 2.0 ** -7
        return all(_scalar(v, want, eps) for v, want in ((sqrt2, math.sqrt(2)), (one, 1.0), (half, 0.5)))

    def rewrite(self, op, x, **_):
        return op.Gelu(x, _domain=MSFT_DOMAIN)


def _scalar(v: ir.Value, value: float, rel: float) -> bool:
    """``v`` is a one-element constant equal to ``value`` up to a relative ``rel``."""
    c = const(v)
    return c is not None and c.size == 1 and math.isclose(float(c.reshape(-1)[0]), value, rel_tol=rel)


# deepest first: a chain of two Slices must not be matched as one Slice of a non-weight
PREMASK_RULES = pattern.RewriteRuleSet([PremaskedWeight.rule(d) for d in (3, 2, 1)])
# onnxscript ships the erf-GELU fusion (0.5 x (1 + erf(x / sqrt 2)) -> com.microsoft.Gelu); its
# constants match fp32 only, so half precision has its own rule
GELU_RULES = pattern.RewriteRuleSet([*erfgelu.rules.rules, gelu.GeluErfFusion.rule(),
                                     HalfPrecisionErfGelu.rule(0), HalfPrecisionErfGelu.rule(1)], commute=True)
SPLIT_RULES = pattern.RewriteRuleSet([SplitGeluWeights.rule()], commute=True)
ORT_RULES = (PREMASK_RULES, GELU_RULES, SPLIT_RULES)  # in this order: each needs the one before

__all__ = ["ORT_RULES", "PREMASK_RULES", "GELU_RULES", "SPLIT_RULES", "PremaskedWeight", "HalfPrecisionErfGelu",
           "SplitGeluWeights", "top_level", "const", "is_zero_start_slice", "tril_k_is_zero"]
