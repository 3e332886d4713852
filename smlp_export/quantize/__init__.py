"""Weight-only int8 / int4 quantized exports (``smlp export --quantize int8|int4 [--block-size N]``).

- ``scheme``: which weights, the one quantize / dequantize formula, the packing helpers;
- ``ort`` / ``portable``: the graph rewrites per target (QMoE + MatMulNBits; DequantizeLinear);
- ``twin``: the fake-quant PyTorch twin the validator compares against with float tolerances;
- ``quality``: quantized export vs float model on held-out text (ppl, top-1, KL, routing).
"""
from __future__ import annotations

from typing import Any

from .scheme import BLOCK_SIZES, DEFAULT_BLOCK, METHODS, MIN_OPSET_DQ, QuantizeError, QuantScheme

TARGETS = ("ort", "portable")
# ONNX Runtime fuses DequantizeLinear + MatMul (a quantized portable graph) into MatMulNBits with
# accuracy level 4 by default, i.e. int8 *activations* (measured 0.43 max logit error on the
# default model): sessions that must compute what the graph says set level 0. No-op otherwise.
ORT_EXACT_SESSION_CONFIG = {"session.qdq_matmulnbits_accuracy_level": "0"}  # tensorrt: docs/kernels.md, "Weight-only int4 on TensorRT"


def check_request(scheme: QuantScheme, *, target: str, dtype: str, opset: int) -> None:
    """Refuse, in one line, what a target / dtype / opset cannot carry (before anything is traced)."""
    if target not in TARGETS:
        raise QuantizeError(f"--quantize is not available for --target {target} (choose one of {', '.join(TARGETS)}; "
                            "docs/kernels.md says what a TensorRT int4 grouped GEMM would need)")
    if dtype not in (None, "fp32"):  # None: the checkpoint's dtype, which quantizing turns into fp32
        raise QuantizeError(f"--quantize keeps float32 activations; use it with --dtype fp32, not {dtype}")
    if target == "portable" and opset < MIN_OPSET_DQ:
        raise QuantizeError(f"--quantize with --target portable needs --opset {MIN_OPSET_DQ} or newer "
                            f"(blockwise DequantizeLinear), not {opset}")


def check_model(model, scheme: QuantScheme, *, target: str) -> None:
    """Refuse a model the scheme cannot quantize (block size vs widths, expert activation)."""
    from ..export.translations import ORT_ACTIVATIONS
    from ..export.weights import meta_twin
    from .scheme import check_widths

    twin = meta_twin(model)
    check_widths({k: tuple(v.shape) for k, v in twin.state_dict().items()}, scheme)
    cfg = model.config
    if target == "ort" and cfg.n_sparse and cfg.expert_activation not in ORT_ACTIVATIONS:
        raise QuantizeError(f"--quantize --target ort needs token experts ONNX Runtime's QMoE can run; "
                            f"expert_activation {cfg.expert_activation!r} has no QMoE activation (use --target portable)")


def quantize_graph(proto, source, scheme: QuantScheme, target: str) -> dict[str, int]:
    """Rewrite a traced graph (lazy placeholders allowed) in place; {parameter: quantized bytes}."""
    from .scheme import quantized_parameters

    if target == "ort":
        from .ort import quantize_ort as rewrite
    else:
        from .portable import quantize_portable as rewrite
    done = rewrite(proto, source, scheme)
    # the twin quantizes every one of these: a weight the graph kept in float would differ from it
    missing = sorted(set(quantized_parameters(source.keys())) - set(done))
    if missing:
        raise QuantizeError(f"the {target} graph has no quantizable use of {', '.join(missing[:3])}"
                            + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
    return done


def manifest_entry(scheme: QuantScheme, done: dict[str, int], model) -> dict[str, Any]:
    """manifest["quantization"]: the scheme and what it covered (bits per weight over the quantized ones)."""
    from ..export.weights import meta_twin

    shapes = {k: v.numel() for k, v in meta_twin(model).state_dict().items()}
    n = sum(shapes[p] for p in done)
    entry = scheme.to_manifest()
    entry.update(parameters=sorted(done), quantized_weights=n, quantized_bytes=sum(done.values()),
                 bits_per_weight=round(8 * sum(done.values()) / n, 3) if n else None,
                 float_weights=sum(v for k, v in shapes.items() if k not in done))
    return entry


__all__ = ["BLOCK_SIZES", "DEFAULT_BLOCK", "METHODS", "QuantScheme", "QuantizeError", "check_model",
           "check_request", "manifest_entry", "quantize_graph"]
