"""The fake-quant twin: the PyTorch model with every quantized weight replaced by
``dequantize(quantize(w))`` (``scheme.py``), i.e. exactly the numbers a quantized export holds.

The validator compares a quantized export against this twin with the float tolerances: a wrong
scale, zero point, packing order or block size on any weight the export quantizes shows as a
parity failure, while the quantization error itself (export vs float model) is measured
separately (``quality.py``).
"""
from __future__ import annotations

import copy

from .scheme import QuantScheme, dequantize, quantize, quantized_parameters


def fake_quant_twin(model, scheme: QuantScheme, *, inplace: bool = False):
    """A copy of ``model`` (float32) whose quantized parameters hold their dequantized values."""
    import torch

    twin = model if inplace else copy.deepcopy(model)
    params = dict(twin.named_parameters())
    with torch.no_grad():
        for name, kind in quantized_parameters(params).items():
            p = params[name]
            w = p.detach().float().cpu().numpy()
            q, s = quantize(w, scheme.bits, scheme.block_for(kind))
            p.copy_(torch.from_numpy(dequantize(q, s)).to(p.dtype))
    for attr in ("tokenizer", "checkpoint_info"):
        if hasattr(model, attr):
            setattr(twin, attr, getattr(model, attr))
    return twin.eval()
