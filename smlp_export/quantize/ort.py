"""``ort`` target: dense ``MatMul`` -> ``com.microsoft.MatMulNBits``, token ``MoE`` -> ``com.microsoft.QMoE``.

Layouts (pinned against NumPy in tests/test_quantize.py, single-op tests):
- MatMulNBits: B uint8 [N, K / block, block * bits / 8] (the [N, K] weight, i.e. the transpose of
  the graph's [K, N] MatMul operand, packed along K, first value in the low nibble), scales
  float32 [N, K / block], no zero points (default 2^(bits-1)), ``accuracy_level`` 0 (float
  activations: weight-only).
- QMoE: fc1 uint8 [E, f, d * bits / 8] (= the model's w1 [E, f, d] packed along d), fc2 uint8
  [E, d, f * bits / 8], scales [E, N, K / block] (blocked) or [E, N] (per channel, int8),
  ``expert_weight_bits`` and ``block_size`` attributes; the MoE node's other inputs/attributes carry over.
"""
from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from ..export.weights import WeightSource, _all_graphs
from .scheme import QuantizeError, QuantScheme, pack_unsigned, quantize
from .weights import GraphWeight, graph_weight, value

MSFT = "com.microsoft"


def _init_index(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for g in _all_graphs(proto.graph) for t in g.initializer}


def _matmulnbits(node: onnx.NodeProto, gw: GraphWeight, w, scheme: QuantScheme, out: list) -> onnx.NodeProto:
    if gw.k_axis != 0 or w.ndim != 2:
        raise QuantizeError(f"{gw.name}: expected a [K, N] MatMul weight")
    k, n = w.shape
    block = scheme.block_for(gw.kind) or k
    q, s = quantize(w.T, scheme.bits, block)  # [N, K] rows, blocks along K
    b = pack_unsigned(q, scheme.bits).reshape(n, k // block, block * scheme.bits // 8)
    out += [numpy_helper.from_array(b, f"{gw.name}.q{scheme.bits}"), numpy_helper.from_array(s, f"{gw.name}.scales")]
    return helper.make_node("MatMulNBits", [node.input[0], f"{gw.name}.q{scheme.bits}", f"{gw.name}.scales"],
                            list(node.output), name=node.name or None, domain=MSFT,
                            K=k, N=n, bits=scheme.bits, block_size=block, accuracy_level=0)


def _qmoe(node: onnx.NodeProto, weights: dict[int, tuple[GraphWeight, object]], scheme: QuantScheme,
          out: list) -> onnx.NodeProto:
    ins = list(node.input) + [""] * (6 - len(node.input))
    block = scheme.expert_block
    packed = {}
    for i in (2, 4):  # fc1, fc2 weights of com.microsoft.MoE
        gw, w = weights[i]
        if gw.k_axis != w.ndim - 1:
            raise QuantizeError(f"{gw.name}: expert weights must be [E, N, K]")
        q, s = quantize(w, scheme.bits, block)
        if not block:
            s = s[..., 0]  # per channel: [E, N]
        out += [numpy_helper.from_array(pack_unsigned(q, scheme.bits), f"{gw.name}.q{scheme.bits}"),
                numpy_helper.from_array(s, f"{gw.name}.scales")]
        packed[i] = (f"{gw.name}.q{scheme.bits}", f"{gw.name}.scales")
    inputs = [ins[0], ins[1], packed[2][0], packed[2][1], ins[3], packed[4][0], packed[4][1], ins[5]]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    attrs["expert_weight_bits"] = scheme.bits
    if block:
        attrs["block_size"] = block
    return helper.make_node("QMoE", inputs, list(node.output), name=node.name or None, domain=MSFT, **attrs)


def quantize_ort(proto: onnx.ModelProto, source: WeightSource, scheme: QuantScheme) -> dict[str, int]:
    """Rewrite ``proto`` in place; returns {parameter: quantized bytes} of what it quantized.

    Every float initializer it replaced must end up unused (else the export would still carry,
    and run, float weights the manifest calls quantized): that is an error, not a silent fallback.
    """
    inits = _init_index(proto)
    done: dict[str, int] = {}
    replaced: set[str] = set()
    new_inits: list[onnx.TensorProto] = []
    for g in _all_graphs(proto.graph):
        for i, node in enumerate(list(g.node)):
            made: list[onnx.TensorProto] = []
            if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and node.input[1] in inits:
                gw = graph_weight(inits[node.input[1]], source)
                if gw is None:
                    continue
                g.node[i].CopyFrom(_matmulnbits(node, gw, value(inits[gw.name], source), scheme, made))
                used = [gw]
            elif node.op_type == "MoE" and node.domain == MSFT:
                ws = {}
                for j in (2, 4):
                    gw = graph_weight(inits[node.input[j]], source) if node.input[j] in inits else None
                    if gw is None:
                        raise QuantizeError(f"token MoE node {node.name}: expert weights {node.input[j]} "
                                            "are not quantizable")
                    ws[j] = (gw, value(inits[gw.name], source))
                g.node[i].CopyFrom(_qmoe(node, ws, scheme, made))
                used = [ws[2][0], ws[4][0]]
            else:
                continue
            for gw in used:
                replaced.add(gw.name)
                done[gw.param] = done.get(gw.param, 0) + sum(
                    len(t.raw_data) for t in made if t.name.startswith(gw.name + "."))
            new_inits += made
    proto.graph.initializer.extend(new_inits)
    _drop_unused(proto, replaced)
    return done


def _drop_unused(proto: onnx.ModelProto, names: set[str]) -> None:
    used = {i for g in _all_graphs(proto.graph) for n in g.node for i in n.input}
    still = sorted(names & used)
    if still:
        raise QuantizeError(f"quantized weights still used in float by other nodes: {', '.join(still[:3])}")
    for g in _all_graphs(proto.graph):
        keep = [t for t in g.initializer if t.name not in names]
        del g.initializer[:]
        g.initializer.extend(keep)
