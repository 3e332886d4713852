"""Build the ONNX graph of an sMLP model for one target: torch.export -> dynamo ONNX -> finish.

``build_onnx(model, target=..., dtype=..., opset=...)`` returns an ``onnx.ModelProto`` with

- input ``input_ids`` int64 [batch, seq] (1 <= seq <= max_seq_len; both axes dynamic);
- output ``logits`` float32 [batch, seq, vocab] and the router outputs the validator compares:
  ``router.blocks.{i}.tmoe`` [batch, seq, E_t] (token-router logits) and, for partial spatial
  routing, ``router.blocks.{i}.smoe`` [batch, c, E_s] (channel-router probabilities), in block
  order. With ``dtype="fp16"`` / ``"bf16"`` the graph computes in that dtype, except LayerNorms and
  the routers (float32, ``smlp_export.precision``), and casts its outputs to float32 at the
  very end (one Cast per output): callers get one output type for every export, and downstream
  softmax / sampling over 257 logits does not run in half precision.

The graph is made deterministic (node metadata with stack traces stripped, symbolic dims renamed
to ``batch`` / ``seq``), so the same checkpoint and options give byte-identical files.
"""
from __future__ import annotations

from typing import Any

import onnx

from .translations import translation_table

DIM_NAMES = ("batch", "seq")


def routing_layout(model) -> list[tuple[str, str]]:
    """[(layer name, kind)] of the model's router outputs, in output order (one tiny eager run)."""
    import torch

    routing: dict[str, Any] = {}
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long), routing)
    return [(name, "tmoe_logits" if name.endswith(".tmoe") else "smoe_probs") for name in routing]


class _Wrapper:
    """Built lazily (torch import) as an nn.Module returning (logits, *router outputs) in float32."""

    @staticmethod
    def make(model, names: list[str]):
        import torch

        class Wrapped(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = model

            def forward(self, input_ids: torch.Tensor):
                routing: dict[str, torch.Tensor] = {}
                logits = self.model(input_ids, routing)
                return (logits.float(), *[routing[n].float() for n in names])

        return Wrapped().eval()


def _trace(model, target: str, dtype: str, opset: int, names: list[str], ort_moe: str) -> onnx.ModelProto:
    """torch.export with dynamic batch/seq, then the dynamo ONNX exporter with our translations."""
    import torch

    from .trace import trace, twin

    cfg = model.config
    m, source = twin(model, dtype)
    wrapped = _Wrapper.make(m, names)
    # T = 2 as the example: T = 1 would let torch specialise size-1 broadcasts.
    ids = torch.zeros(2, min(2, cfg.max_seq_len), dtype=torch.long)
    # Dim.DYNAMIC, not Dim("seq", max=n): slicing W[:T, :T] makes torch guard T != n, which a
    # bounded Dim rejects; the ONNX Slice it becomes is correct for every 1 <= T <= n.
    dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    return trace(wrapped, (ids,), (dyn,), opset=opset,
                 table=translation_table(target, dtype, opset, ort_moe=ort_moe),
                 input_names=["input_ids"], output_names=["logits", *[f"router.{n}" for n in names]],
                 source=source)


def build_onnx(model, *, target: str, dtype: str, opset: int, ir_version: int = 10,
               ort_moe: str = "fused", causal_block: int | None = None, lazy: bool = False) -> onnx.ModelProto:
    """The finished, checked-ready ONNX model of ``model`` (an SMLPForCausalLM in eval mode).

    ``ort_moe`` (ort target): "fused" com.microsoft.MoE, "loop" (the portable formulation) or
    "auto" (an If per layer: fused for at most ``AUTO_FUSED_MAX_TOKENS`` tokens, else loop).
    ``causal_block`` (ort / portable): rows per block of the blocked-causal spatial products
    (``blocked_causal.py``); 0 = dense products, None = ``default_block(max_seq_len)``.
    ``lazy``: large initializers stay placeholders (``weights.py``) for ``weights.write_model``
    to fill from ``weights.source_for(model)`` one at a time; else they hold their data."""
    from .blocked_causal import default_block
    from .rewrites import Rewrites
    from .trace import finish

    names = [n for n, _ in routing_layout(model)]
    n = model.config.max_seq_len
    rewrites = Rewrites(target, ort_moe=ort_moe, optimize=True, max_seq_len=n,
                        causal_block=default_block(n) if causal_block is None else causal_block)
    proto = finish(_trace(model, target, dtype, opset, names, ort_moe), model, target=target, dtype=dtype,
                   opset=opset, ir_version=ir_version, dim_names=DIM_NAMES, unroll_experts=target == "ort", empty_docs=True,
                   rewrites=rewrites)
    if not lazy:
        from .weights import materialize, source_for

        materialize(proto, source_for(model))
    return proto


def node_counts(model: onnx.ModelProto) -> dict[str, int]:
    """Top-level nodes by ``domain::op_type`` (default domain shown bare), most frequent first."""
    counts: dict[str, int] = {}
    for n in model.graph.node:
        key = f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def io_spec(model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Graph inputs/outputs as manifest entries: {name, dtype, shape: ["batch", "seq", 257]}."""
    def entry(vi: onnx.ValueInfoProto) -> dict:
        tt = vi.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        return {"name": vi.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name, "shape": shape}

    return [entry(v) for v in model.graph.input], [entry(v) for v in model.graph.output]
