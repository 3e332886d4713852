"""``decode_seq.onnx``: the decode step with a per-row position, for Triton's sequence batcher.

Same weights and ops as ``decode.onnx`` (``export.py``), but ``sequence.SequenceStep`` is traced:

| name | dtype | shape | meaning |
|---|---|---|---|
| ``input_ids`` (in) | int64 | [batch, new] | new tokens |
| ``position`` (in) | int64 | [batch, 1] | row b's absolute position (implicit state in Triton) |
| ``START`` (in) | int32 | [batch, 1] | 1 on a sequence's first request (Triton's CONTROL_SEQUENCE_START): position taken as 0 |
| ``state.blocks.{i}`` (in) | compute dtype | [batch, max_seq_len, c] | spatial state (implicit state) |
| ``logits`` (out) | float32 | [batch, new, vocab] | next-token logits |
| ``new_position`` (out) | int64 | [batch, 1] | position + new |
| ``new_state.blocks.{i}`` (out) | compute dtype | [batch, max_seq_len, c] | updated state (one ScatterND) |

``decode.onnx`` (scalar position) stays as it is: ``OrtGenerator`` and ``smlp generate`` use it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx

from .export import INPUT_IDS, LOGITS, OUT_PREFIX, POSITION, finish_step_graph
from ..artifacts import SEQ_FILE
from .state import state_names

START = "START"  # the sequence batcher's control input (CONTROL_SEQUENCE_START, int32 0/1)
NEW_POSITION = OUT_PREFIX + POSITION


def _trace(model, target: str, dtype: str, opset: int) -> onnx.ModelProto:
    import torch

    from ..export.trace import trace, twin
    from ..export.translations import translation_table
    from ..precision import COMPUTE_DTYPES
    from .sequence import SequenceStep

    cfg = model.config
    m, source = twin(model, dtype)  # traced without data, same mixed precision as model.onnx
    tdt = COMPUTE_DTYPES[dtype]

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.step = SequenceStep(m)

        def forward(self, input_ids, position, start, *states):
            out = self.step(input_ids, position, start, *states)
            return (out[0].float(), out[1], *out[2:])

    names = state_names(m)
    B, S = 2, 2  # not 1: size-1 example dims get specialised
    meta = torch.device("meta")
    ids = torch.zeros(B, S, dtype=torch.long, device=meta)
    pos = torch.zeros(B, 1, dtype=torch.long, device=meta)
    start = torch.zeros(B, 1, dtype=torch.int32, device=meta)
    states = tuple(torch.zeros(B, cfg.max_seq_len, cfg.spatial_channels, dtype=tdt, device=meta) for _ in names)
    batch, new = torch.export.Dim("batch", min=1), torch.export.Dim.DYNAMIC
    dyn = ({0: batch, 1: new}, {0: batch}, {0: batch}, tuple({0: batch} for _ in names))
    return trace(Wrapped().eval(), (ids, pos, start, *states), dyn, opset=opset,
                 table=translation_table(target, dtype, opset), input_names=[INPUT_IDS, POSITION, START, *names],
                 output_names=[LOGITS, NEW_POSITION, *[OUT_PREFIX + n for n in names]], source=source)


def build_sequence_onnx(model, *, target: str = "ort", dtype: str = "fp32", opset: int = 18,
                        ir_version: int = 10, lazy: bool = False) -> onnx.ModelProto:
    """The checked per-row-position decode graph of ``model`` (see the module docstring)."""
    return finish_step_graph(_trace(model, target, dtype, opset), model, target=target, dtype=dtype, opset=opset,
                             ir_version=ir_version, lazy=lazy)


def sequence_manifest(model, *, file: str = SEQ_FILE) -> dict[str, Any]:
    """``manifest["decode"]["sequence"]``: file and I/O names of the per-row-position graph."""
    names = state_names(model)
    return {"file": file,
            "inputs": {"input_ids": INPUT_IDS, "position": POSITION, "start": START, "states": names},
            "outputs": {"logits": LOGITS, "position": NEW_POSITION, "states": [OUT_PREFIX + n for n in names]},
            "position_shape": ["batch", 1]}


def export_sequence_graph(model, path: Path, *, target: str = "ort", dtype: str = "fp32", opset: int = 18,
                          quantize=None) -> dict[str, Any]:
    """Write ``decode_seq.onnx`` to ``path`` atomically (large weights in ``<name>.data`` beside it)
    and return its manifest section (``manifest["decode"]["sequence"]``; ``data_file`` when the weights went beside it)."""
    from ..export.weights import save_graph, source_for

    path = Path(path)
    proto = build_sequence_onnx(model, target=target, dtype=dtype, opset=opset, lazy=True)
    if quantize is not None:  # a smlp_export.quantize.QuantScheme: the same weights as model.onnx's
        from ..quantize import quantize_graph

        quantize_graph(proto, source_for(model), quantize, target)
    names = save_graph(proto, path, source_for(model))
    section = sequence_manifest(model, file=path.name)
    if len(names) > 1:
        section["data_file"] = names[1]
    return section
