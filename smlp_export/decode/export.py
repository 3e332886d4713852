"""``decode.onnx``: the incremental (spatial-state cache) step of an sMLP as one ONNX graph.

Inputs: ``input_ids`` int64 [batch, new] (1 <= new), ``position`` int64 [] (absolute position of
the first new token), one ``state.blocks.{i}`` [batch, max_seq_len, c] per block (compute dtype).
Outputs: ``logits`` float32 [batch, new, vocab] and ``new_state.blocks.{i}`` (same shape/dtype as
the inputs; rows ``[position, position + new)`` replaced by the new z2 rows, a ScatterND).
Prefill (new > 1) and decode (new = 1) are the same graph.

The graph is ``state.DecodeStep`` traced with ``torch.export`` and converted with the dynamo ONNX
exporter using the exporter's per-target translation table (``smlp_export.export.translations``):
token MoE becomes the same node as in the full graph (``com.microsoft.MoE`` for ``ort``, an
``smlp`` plugin node + model-local function for ``tensorrt``, inlined standard ops for
``portable``). The spatial decode form (``where(u <= t, W[t, u], 0) @ state``, ``Gather`` of W
rows, ``ScatterND`` state update, partial routing from ``state[:, :p]``) is standard ONNX ops for
every target. No range check lives in the graph: the runtime checks position / shapes / ids.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from ..artifacts import DECODE_FILE
from .state import DecodeStep, state_names

INPUT_IDS, POSITION, LOGITS = "input_ids", "position", "logits"
OUT_PREFIX = "new_"  # output name of a state = "new_" + its input name


def _wrapper(model, dtype: str):
    import torch

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = DecodeStep(model)

        def forward(self, input_ids, position, *states):
            out = self.step(input_ids, position, *states)
            return (out[0].float(), *out[1:])

    return Wrapped().eval()


def _trace(model, target: str, dtype: str, opset: int) -> onnx.ModelProto:
    import torch

    from ..export.trace import trace, twin
    from ..export.translations import translation_table
    from ..precision import COMPUTE_DTYPES

    cfg = model.config
    m, source = twin(model, dtype)  # same mixed precision as model.onnx
    tdt = COMPUTE_DTYPES[dtype]
    wrapped = _wrapper(m, dtype)
    names = state_names(m)
    B, S = 2, 2  # not 1: size-1 example dims get specialised
    meta = torch.device("meta")  # example inputs on the twin's device (only shapes are traced)
    ids = torch.zeros(B, S, dtype=torch.long, device=meta)
    pos = torch.tensor(0, dtype=torch.long, device=meta)
    states = tuple(torch.zeros(B, cfg.max_seq_len, cfg.spatial_channels, dtype=tdt, device=meta) for _ in names)
    batch, new = torch.export.Dim("batch", min=1), torch.export.Dim.DYNAMIC
    dyn = ({0: batch, 1: new}, None, tuple({0: batch} for _ in names))  # *states is one varargs entry
    return trace(wrapped, (ids, pos, *states), dyn, opset=opset, table=translation_table(target, dtype, opset),
                 input_names=[INPUT_IDS, POSITION, *names],
                 output_names=[LOGITS, *[OUT_PREFIX + n for n in names]], source=source)


def finish_step_graph(proto: onnx.ModelProto, model, *, target: str, dtype: str, opset: int,
                      ir_version: int, lazy: bool) -> onnx.ModelProto:
    """``trace.finish`` for a decode step graph (decode.onnx, decode_seq.onnx): dims ``batch`` /
    ``new``, the expert loop not unrolled, the target's smlp-node rewrites only (the step's
    spatial form has no causal product); checked unless ``lazy`` (then check the written file)."""
    from ..export.rewrites import Rewrites
    from ..export.trace import finish
    from ..export.weights import materialize, source_for

    proto = finish(proto, model, target=target, dtype=dtype, opset=opset, ir_version=ir_version,
                   dim_names=("batch", "new"), unroll_experts=False, empty_docs=False, rewrites=Rewrites(target))
    if not lazy:
        materialize(proto, source_for(model))
        onnx.checker.check_model(proto)
    return proto


def build_decode_onnx(model, *, target: str = "ort", dtype: str = "fp32", opset: int = 18,
                      ir_version: int = 10, lazy: bool = False) -> onnx.ModelProto:
    """The checked decode graph of ``model`` (SMLPForCausalLM) for one export target.

    ``lazy``: large initializers stay placeholders for ``weights.write_model`` (then unchecked:
    check the written file)."""
    from ..export.translations import DTYPES, TARGETS

    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return finish_step_graph(_trace(model, target, dtype, opset), model, target=target, dtype=dtype, opset=opset,
                             ir_version=ir_version, lazy=lazy)


def decode_manifest(model, *, target: str, dtype: str, opset: int, file: str = DECODE_FILE) -> dict[str, Any]:
    """The ``manifest["decode"]`` section: file, I/O names, state names / shapes / dtype, rules."""
    cfg = model.config
    names = state_names(model)
    state_dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(dtype, "float32")
    return {
        "file": file,
        "target": target,
        "dtype": dtype,
        "opset": opset,
        "inputs": {"input_ids": INPUT_IDS, "position": POSITION, "states": names},
        "outputs": {"logits": LOGITS, "states": [OUT_PREFIX + n for n in names]},
        "state_shape": ["batch", cfg.max_seq_len, cfg.spatial_channels],
        "state_dtype": state_dtype,
        "logits_dtype": "float32",
        "max_seq_len": cfg.max_seq_len,
        "vocab_size": cfg.vocab_size,
        "eos_token_id": cfg.eos_token_id,
        # partial-prediction models: the first step must cover positions [0, p)
        "min_prompt_tokens": max(1, cfg.prefix_len),
        "spatial_routing": cfg.spatial_routing,
    }


def export_decode_graph(model, path: Path, *, target: str = "ort", dtype: str = "fp32", opset: int = 18,
                        quantize=None) -> dict[str, Any]:
    """Write ``decode.onnx`` to ``path`` (atomically: temp file + rename) and return its manifest
    section (store it as ``manifest["decode"]``). ``model``: an SMLPForCausalLM (any mode; a copy
    is put in eval mode)."""
    from ..export.weights import save_graph, source_for

    path = Path(path)
    proto = build_decode_onnx(model, target=target, dtype=dtype, opset=opset, lazy=True)
    if quantize is not None:  # a smlp_export.quantize.QuantScheme: the same weights as model.onnx's
        from ..quantize import quantize_graph

        quantize_graph(proto, source_for(model), quantize, target)
    names = save_graph(proto, path, source_for(model))
    section = decode_manifest(model, target=target, dtype=dtype, opset=opset, file=path.name)
    if len(names) > 1:
        section["data_file"] = names[1]
    return section
