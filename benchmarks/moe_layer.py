"""Benchmark 3: the sparse token-MoE layer alone, over token counts 1..8192.

Three formulations of the same layer (inference routing, top-1 "base" by default) on CPU:
- reference: the custom op's CPU kernel (``smlp_export.ops.token_moe_reference``: tokens sorted by
  expert, one GEMM per expert that received tokens): cost ~ N * k.
- naive loop: a per-expert Python loop with boolean masks (the usual hand-written MoE).
- dense: every expert on every token, then the routed outputs picked out (what a trace-friendly
  export does when it cannot express sparsity): cost ~ N * E.
- ort_moe: for reference, ONNX Runtime's fused com.microsoft.MoE kernel (what the ``ort`` export
  runs), as a one-layer ONNX graph with the same weights (base routing: x sigmoid(top logit)).
All three are checked to agree before anything is timed. Run: ``python benchmarks/moe_layer.py [--quick]``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common  # noqa: E402
from smlp_export.ops.token_moe import activation_fn, route_tokens, token_moe_reference  # noqa: E402


def naive_loop(hidden, logits, w1, b1, w2, b2, routing, k, act):
    """Per-expert loop with masks: gathers the expert's rows, runs its FFN, scatters back."""
    ids, gates = route_tokens(logits, routing, k)
    out = torch.zeros_like(hidden)
    for e in range(w1.shape[0]):
        for j in range(k):
            mask = ids[:, j] == e
            if mask.any():
                rows = hidden[mask]
                y = F.linear(activation_fn(act, F.linear(rows, w1[e], b1[e])), w2[e], b2[e])
                out[mask] += gates[mask, j, None] * y
    return out


def dense_all_experts(hidden, logits, w1, b1, w2, b2, routing, k, act):
    """All E experts on all N tokens ([E, N, d] intermediate), combined with a dense gate matrix."""
    ids, gates = route_tokens(logits, routing, k)
    dense_gates = torch.zeros_like(logits).scatter(1, ids, gates)  # [N, E], zero for unrouted experts
    h = activation_fn(act, torch.einsum("nd,efd->enf", hidden, w1) + b1[:, None, :])
    y = torch.einsum("enf,edf->end", h, w2) + b2[:, None, :]  # [E, N, d]
    return torch.einsum("end,ne->nd", y, dense_gates)


def ort_moe_layer(w1, b1, w2, b2, routing: str, k: int, threads: int):
    """A callable with the token_moe signature that runs ONNX Runtime's com.microsoft.MoE.

    com.microsoft.MoE gates with softmax over the top k (normalize_routing_weights=1); the model's
    "base" routing gates with sigmoid(top logit) instead, so the graph multiplies by it after the node.
    """
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from smlp_export.runners.ort_session import create_session

    E, f, d = w1.shape
    inits = [numpy_helper.from_array(t.numpy().astype(np.float32), n)
             for t, n in ((w1, "fc1_w"), (b1, "fc1_b"), (w2, "fc2_w"), (b2, "fc2_b"))]
    nodes = [helper.make_node("MoE", ["x", "logits", "fc1_w", "fc1_b", "fc2_w", "fc2_b"],
                              ["y" if routing == "base" else "out"], domain="com.microsoft", k=k,
                              activation_type="gelu", normalize_routing_weights=1)]
    if routing == "base":
        nodes += [helper.make_node("ReduceMax", ["logits"], ["top"], axes=[-1], keepdims=1),
                  helper.make_node("Sigmoid", ["top"], ["gate"]), helper.make_node("Mul", ["y", "gate"], ["out"])]
    graph = helper.make_graph(nodes, "moe", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d]),
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", E])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 10
    sess = create_session(model.SerializeToString(), intra_op_threads=threads, inter_op_threads=1)

    def run(hidden, logits, *_):
        return torch.from_numpy(sess.run(None, {"x": hidden.numpy(), "logits": logits.numpy()})[0])

    return run


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-expert", type=int, default=512)
    p.add_argument("--routing", default="base", choices=["base", "topk"])
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--tokens", default="1,4,16,64,256,1024,4096,8192")
    p.add_argument("--naive-max-tokens", type=int, default=8192, help="skip the naive loop above this many tokens")
    args = p.parse_args()

    from smlp_export.bench.machine import describe_machine, short_description
    from smlp_export.bench.timing import measure_interleaved

    threads = _common.setup_threads(args.threads)
    tokens = [int(t) for t in args.tokens.split(",")]
    if args.quick:
        tokens = [t for t in tokens if t in (1, 64, 1024, 8192)] or tokens
    E, d, f, k, act = args.experts, args.d_model, args.d_expert, args.k, "gelu_tanh"
    gen = torch.Generator().manual_seed(0)
    w1 = torch.randn(E, f, d, generator=gen) * 0.05
    b1 = torch.randn(E, f, generator=gen) * 0.01
    w2 = torch.randn(E, d, f, generator=gen) * 0.05
    b2 = torch.randn(E, d, generator=gen) * 0.01
    centroids = torch.randn(E, d, generator=gen)
    impls = {"reference": token_moe_reference, "naive_loop": naive_loop, "dense": dense_all_experts}
    # Expert activation gelu_tanh == ORT MoE's "gelu" (runtime-facts.md), so all four agree.
    impls["ort_moe"] = ort_moe_layer(w1, b1, w2, b2, args.routing, k, threads)
    cfg = _common.timing(args.quick)
    rows = []
    print(f"token MoE layer: E={E} d={d} f={f} routing={args.routing} k={k}, {threads} threads; "
          f"{short_description(describe_machine())}")
    print(f"{'tokens':>7}{'reference ms':>14}{'naive ms':>11}{'dense ms':>11}{'ort MoE ms':>12}"
          f"{'dense/ref':>11}{'naive/ref':>11}{'ortMoE/ref':>12}")
    with torch.inference_mode():
        for n in tokens:
            hidden = torch.randn(n, d, generator=gen)
            logits = hidden @ centroids.T
            argv = (hidden, logits, w1, b1, w2, b2, args.routing, k, act)
            ref = token_moe_reference(*argv)
            row = {"tokens": n}
            fns = {}
            for name, fn in impls.items():
                if name == "naive_loop" and n > args.naive_max_tokens:
                    continue
                # Same numbers first (fp32: different summation orders only), then time.
                torch.testing.assert_close(fn(*argv), ref, rtol=1e-4, atol=1e-5)
                fns[name] = lambda fn=fn: fn(*argv)
            # Side by side (rounds): the ratios are taken under the same machine load.
            for name, st in measure_interleaved(fns, cfg).items():
                if isinstance(st, Exception):
                    raise st
                row[name] = st.to_dict()
            rows.append(row)
            p50 = {name: row[name]["p50_ms"] for name in impls if name in row}
            naive = p50.get("naive_loop")
            om = p50.get("ort_moe", float("nan"))
            print(f"{n:>7}{p50['reference']:>14.3f}{naive if naive is not None else float('nan'):>11.3f}"
                  f"{p50['dense']:>11.3f}{om:>12.3f}{p50['dense'] / p50['reference']:>11.2f}"
                  f"{(naive or float('nan')) / p50['reference']:>11.2f}{om / p50['reference']:>12.2f}")
    machine = describe_machine()
    payload = {"config": {"experts": E, "d_model": d, "d_expert": f, "routing": args.routing, "k": k,
                          "activation": act, "threads": threads, "timing": cfg.to_dict()}, "rows": rows}
    out = _common.save("moe_layer", args, payload, machine)
    if not args.no_plot:
        plot(rows, out.with_suffix(".png"), f"token MoE E={E} d={d} f={f}; {short_description(machine)}")


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smlp_export.bench.report import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in ("reference", "naive_loop", "dense", "ort_moe"):
        pts = [(r["tokens"], r[name]["p50_ms"]) for r in rows if name in r]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("tokens N")
    ax.set_ylabel("p50 latency (ms)")
    ax.set_title(title, fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
