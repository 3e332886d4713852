"""ONNX Runtime's quantized CPU kernels alone, side by side at 1 thread: why quantized decode is
not faster here (docs/export.md, "Quantized exports", speed).

MatMul [M, 768] x [768, 3072] as fp32 MatMul vs MatMulNBits (8 / 4 bits, block 32) at
accuracy_level 0 (float activations: what the exports use, exact against the fake-quant twin)
and 4 (int8 activations), and one token-MoE layer (16 experts, d 768, f 3072, top-1) as
com.microsoft.MoE fp32 vs QMoE (int8 per channel, int4 block 32); M = 1 and 8 tokens; median ms.
Usage: ``python benchmarks/quantized_ops.py`` (prints one line per case; ~1 minute).
"""
from __future__ import annotations

import statistics
import time

import numpy as np
from onnx import TensorProto as TP
from onnx import helper as h
from onnx import numpy_helper as nh

from smlp_export.quantize.scheme import pack_unsigned, quantize
from smlp_export.runners.ort_session import create_session

RNG = np.random.default_rng(0)


def _session(nodes, ins, outs, inits):
    m = h.make_model(h.make_graph(nodes, "g", ins, outs, inits),
                     opset_imports=[h.make_opsetid("", 18), h.make_opsetid("com.microsoft", 1)], ir_version=10)
    return create_session(m.SerializeToString(), intra_op_threads=1)


def _ms(s, feeds, n=30) -> float:
    s.run(None, feeds)
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        s.run(None, feeds)
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e3, 3)


def _f(name, shape):
    return h.make_tensor_value_info(name, TP.FLOAT, shape)


def main() -> None:
    K, N = 768, 3072
    w = RNG.standard_normal((N, K)).astype(np.float32)
    for M in (1, 8):
        x = RNG.standard_normal((M, K)).astype(np.float32)
        r = {"MatMul fp32": _ms(_session([h.make_node("MatMul", ["x", "W"], ["y"])], [_f("x", [M, K])], [_f("y", [M, N])],
                                         [nh.from_array(np.ascontiguousarray(w.T), "W")]), {"x": x})}
        for bits in (8, 4):
            q, s = quantize(w, bits, 32)
            b = pack_unsigned(q, bits).reshape(N, K // 32, -1)
            for acc in (0, 4):
                node = h.make_node("MatMulNBits", ["x", "B", "S"], ["y"], domain="com.microsoft", K=K, N=N, bits=bits,
                                   block_size=32, accuracy_level=acc)
                r[f"MatMulNBits int{bits} acc{acc}"] = _ms(_session([node], [_f("x", [M, K])], [_f("y", [M, N])],
                                                                    [nh.from_array(b, "B"), nh.from_array(s, "S")]),
                                                           {"x": x})
        print(f"M={M}: " + ", ".join(f"{k} {v} ms" for k, v in r.items()), flush=True)
    E, d, f = 16, 768, 3072
    w1 = (RNG.standard_normal((E, f, d)) * 0.05).astype(np.float32)
    w2 = (RNG.standard_normal((E, d, f)) * 0.05).astype(np.float32)
    b1, b2 = np.zeros((E, f), np.float32), np.zeros((E, d), np.float32)
    for M in (1, 8):
        x = RNG.standard_normal((M, d)).astype(np.float32)
        lg = RNG.standard_normal((M, E)).astype(np.float32)
        io = ([_f("x", [M, d]), _f("r", [M, E])], [_f("y", [M, d])])
        moe = h.make_node("MoE", ["x", "r", "w1", "b1", "w2", "b2"], ["y"], domain="com.microsoft", k=1,
                          activation_type="gelu", normalize_routing_weights=1)
        r = {"MoE fp32": _ms(_session([moe], *io, [nh.from_array(a, n) for a, n in
                                                   ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))]),
                             {"x": x, "r": lg}, 10)}
        for bits, blk in ((8, 0), (4, 32)):
            (q1, s1), (q2, s2) = quantize(w1, bits, blk), quantize(w2, bits, blk)
            if not blk:
                s1, s2 = s1[..., 0], s2[..., 0]
            attrs = dict(k=1, activation_type="gelu", normalize_routing_weights=1, expert_weight_bits=bits)
            if blk:
                attrs["block_size"] = blk
            node = h.make_node("QMoE", ["x", "r", "w1", "s1", "b1", "w2", "s2", "b2"], ["y"], domain="com.microsoft",
                               **attrs)
            inits = [nh.from_array(a, n) for a, n in ((pack_unsigned(q1, bits), "w1"), (s1, "s1"), (b1, "b1"),
                                                      (pack_unsigned(q2, bits), "w2"), (s2, "s2"), (b2, "b2"))]
            r[f"QMoE int{bits} block {blk or 'per-channel'}"] = _ms(_session([node], *io, inits), {"x": x, "r": lg}, 10)
        print(f"MoE M={M}: " + ", ".join(f"{k} {v} ms" for k, v in r.items()), flush=True)


if __name__ == "__main__":
    main()
