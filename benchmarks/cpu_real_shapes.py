"""CPU performance at real shapes: the `ort` export and torch eager on a d=1024, n=1024 model.

A random-init model of the ``small`` shape (d_model 1024, d_ffn 4096, d_expert 4096, n = 1024,
12 blocks of which 2 sparse, 8 spatial experts; token experts ``--experts``) is exported for ``ort``
twice: with dense causal spatial products (``causal_block=0``: ``tril(W)[:T, :T] @ z``, half of
it multiplies zeros) and blocked-causal (``--block`` rows per block, the zero upper-triangle
blocks skipped; smlp_export/export/blocked_causal.py). Each graph is checked against PyTorch
eager first (fp32, relative logits error). Then, per (B, T), torch eager, both ONNX Runtime
graphs and a 1024^3 fp32 torch matmul are timed side by side (interleaved rounds: one load for
all of them), at one thread count.

Achieved GFLOP/s = ``flops_forward(config, B, T)`` (useful FLOPs: every GEMM, active experts only,
causal half of the spatial products; smlp_export/flops.py) / p50. Fraction = that / the GEMM
rate measured in the same case's rounds. Goal: the `ort` export at >= 80 % of the GEMM rate at
T >= 512. Run: ``python benchmarks/cpu_real_shapes.py --threads 1 [--quick]``.
"""
from __future__ import annotations

import gc
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common  # noqa: E402

GOAL_FRACTION = 0.8
GOAL_MIN_T = 512
PARITY_REL = 1e-4  # fp32 graphs vs eager, relative to the logits' scale (summation order only)
SMALL = dict(d_model=1024, d_ffn=4096, d_expert=4096, max_seq_len=1024, n_layers=12, n_sparse=2,
             n_token_experts=16, n_spatial_experts=8)
GEMM_N = 1024


def _cases(spec: str) -> list[tuple[int, int]]:
    """"1x128,8x256" -> [(1, 128), (8, 256)]."""
    return [tuple(int(v) for v in c.split("x")) for c in spec.split(",") if c]  # type: ignore[misc]


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    # B=8, T=1024 is left out: one eager call is ~20 s at one thread here (8192 tokens x ~0.2
    # GFLOP), so its few runs alone would take minutes per backend; T >= 512 is covered by B=1.
    p.add_argument("--cases", default="1x128,1x256,1x512,1x1024,8x128,8x256,8x512")
    p.add_argument("--experts", type=int, default=SMALL["n_token_experts"],
                   help="token experts (the active FLOPs per token do not depend on it)")
    p.add_argument("--block", type=int, default=256, help="rows per block of the blocked-causal graph")
    p.add_argument("--runs", type=int, default=3, help="timed runs per case and backend")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=INT",
                   help="override a field of the model shape (smoke tests on small shapes)")
    args = p.parse_args()

    from smlp_export import SMLPForCausalLM, SMLPConfig
    from smlp_export.bench.machine import describe_machine, short_description
    from smlp_export.bench.sweep import real_token_ids
    from smlp_export.bench.timing import TimingConfig, measure_interleaved
    from smlp_export.export.graph import build_onnx
    from smlp_export.flops import flops_forward, flops_per_token
    from smlp_export.runners.registry import get_runner

    threads = _common.setup_threads(args.threads)
    cases = _cases(args.cases) if not args.quick else [(1, 128), (1, 512)]
    sets = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.sets)}
    cfg = SMLPConfig(**{**SMALL, "n_token_experts": args.experts, **sets})
    torch.manual_seed(0)
    model = SMLPForCausalLM(cfg).eval()
    print(f"cpu real shapes: {model.num_parameters() / 1e6:.0f}M parameters "
          f"({model.num_active_parameters() / 1e6:.0f}M active), {threads} threads; "
          f"{short_description(describe_machine())}")
    timing = TimingConfig(warmup=1, min_runs=1 if args.quick else args.runs, min_time_s=0.0, max_time_s=120.0)
    graphs = {"ort (dense causal)": 0, f"ort (blocked causal, C={args.block})": args.block}
    sessions = {}
    check_ids = real_token_ids(1, 128)
    with torch.inference_mode():
        want = model(torch.from_numpy(check_ids)).numpy()
    scale = float(np.abs(want).max())
    parity = {}
    with tempfile.TemporaryDirectory(prefix="smlp-real-") as tmp:
        for name, block in graphs.items():
            proto = build_onnx(model, target="ort", dtype="fp32", opset=18, ort_moe="auto", causal_block=block)
            path = Path(tmp) / f"b{block}.onnx"
            import onnx

            onnx.save_model(proto, str(path))
            del proto
            gc.collect()
            r = get_runner("ort", path, intra_op_threads=threads)
            r.load()
            rel = float(np.abs(r.run(check_ids)["logits"] - want).max()) / scale
            if rel > PARITY_REL:
                raise SystemExit(f"{name}: logits differ from PyTorch by {rel:.2e} of scale > {PARITY_REL}")
            parity[name] = rel
            sessions[name] = r
            print(f"{name}: exported, parity {rel:.1e} of scale")

        a = torch.randn(GEMM_N, GEMM_N)
        b = torch.randn(GEMM_N, GEMM_N)
        gemm_flops = 2.0 * GEMM_N**3
        rows = []
        for B, T in cases:
            ids = real_token_ids(B, T)
            tid = torch.from_numpy(ids)
            fns = {"gemm": lambda: torch.mm(a, b)}

            def eager(tid=tid):
                with torch.inference_mode():
                    model(tid)

            fns["torch eager"] = eager
            for name, r in sessions.items():
                fns[name] = lambda r=r, ids=ids: r.run(ids)
            stats = measure_interleaved(fns, timing)
            for n, st in stats.items():
                if isinstance(st, Exception):
                    raise SystemExit(f"B={B} T={T} {n} failed: {st}")
            gemm_rate = gemm_flops / (stats["gemm"].p50_ms / 1e3) / 1e9
            useful = flops_forward(cfg, B, T)
            row = {"batch": B, "seq": T, "gflop_useful": useful / 1e9,
                   "gflop_dense_spatial": flops_forward(cfg, B, T, causal=False) / 1e9,
                   "gemm_gflops": gemm_rate, "gemm_p50_ms": stats["gemm"].p50_ms, "backends": {}}
            for n in fns:
                if n == "gemm":
                    continue
                st = stats[n]
                rate = useful / (st.p50_ms / 1e3) / 1e9
                row["backends"][n] = {**st.to_dict(), "gflops": rate, "fraction_of_gemm": rate / gemm_rate}
            rows.append(row)
            print(f"B={B} T={T:<5} gemm {gemm_rate:6.1f} GFLOP/s | " + " | ".join(
                f"{n} p50 {v['p50_ms']:8.1f} ms {v['gflops']:6.1f} GFLOP/s ({v['fraction_of_gemm'] * 100:3.0f}%)"
                for n, v in row["backends"].items()))
        for r in sessions.values():
            r.close()

    dense, blocked = list(graphs)
    goals = []
    big = [r for r in rows if r["seq"] >= GOAL_MIN_T]
    for n in graphs:
        if big:
            worst = min(r["backends"][n]["fraction_of_gemm"] for r in big)
            goals.append(_common.goal_line(f"{n}: min fraction of GEMM rate at T >= {GOAL_MIN_T}", worst,
                                           GOAL_FRACTION, op=">="))
    speedup = {f"{r['batch']}x{r['seq']}": r["backends"][dense]["p50_ms"] / r["backends"][blocked]["p50_ms"]
               for r in rows}
    print("blocked-causal speed-up (p50 dense / p50 blocked): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in speedup.items()))
    machine = describe_machine()
    payload = {"config": {"model": cfg.to_dict(), "params": model.num_parameters(),
                          "active_params": model.num_active_parameters(), "threads": threads,
                          "timing": timing.to_dict(), "block": args.block, "gemm": f"torch.mm fp32 {GEMM_N}^3",
                          "flops_per_token_T1024": flops_per_token(cfg, cfg.max_seq_len),
                          "flops_per_token_T1024_dense_spatial": flops_per_token(cfg, cfg.max_seq_len, causal=False)},
               "parity_rel": parity, "rows": rows, "blocked_speedup": speedup, "goals": goals}
    out = _common.save("cpu_real_shapes", args, payload, machine)
    if not args.no_plot:
        plot(rows, ["torch eager", *graphs], out.with_suffix(".png"),
             f"d=1024 n=1024, {threads} thread(s); {short_description(machine)}")


def plot(rows, names, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smlp_export.bench.report import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, B in zip(axes, sorted({r["batch"] for r in rows})[:2]):
        sub = [r for r in rows if r["batch"] == B]
        xs = [r["seq"] for r in sub]
        for n in names:
            ax.plot(xs, [r["backends"][n]["fraction_of_gemm"] * 100 for r in sub], marker="o", label=n)
        ax.axhline(GOAL_FRACTION * 100, color="grey", linestyle="--", linewidth=1, label="goal (T >= 512)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length T")
        ax.set_title(f"B={B}", fontsize=9)
        ax.grid(True, alpha=0.3)
    axes[0].set_ylabel("achieved useful GFLOP/s, % of fp32 GEMM rate")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))


if __name__ == "__main__":
    main()
