"""Benchmark 2: latency vs number of token experts E, at the same active parameters per token.

Random-init checkpoints of the ``tiny`` architecture with E = 4, 8, 16, 32, 64 token experts (top-1
routing, fixed expert width: every token touches the same number of parameters whatever E is),
exported for ``ort`` and ``portable``; p50 latency of each with ONNX Runtime CPU at fixed B, T.
BASELINE: the dense all-experts export (benchmarks/dense_baseline.py), which computes every
expert on every token. Goal: p50(E=64) / p50(E=4) <= 1.3 for ort and portable.

Every graph is first checked against PyTorch eager on a real held-out batch (max |diff| of the
logits, fp32), so a fast graph that computes something else cannot produce a figure.
Run: ``python benchmarks/experts_scaling.py [--quick] [--batch 8 --seq 128]``.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _common  # noqa: E402
from smlp_export.artifacts import MODEL_FILE  # noqa: E402

GOAL_RATIO = 1.3
PARITY_ATOL = 1e-3  # fp32 graphs vs eager: summation order only (validator uses its own table)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--experts", default="4,8,16,32,64")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--preset", default="tiny")
    args = p.parse_args()

    from smlp_export import SMLPForCausalLM, preset, save_checkpoint
    from smlp_export.bench.machine import describe_machine, short_description
    from smlp_export.bench.sweep import real_token_ids
    from smlp_export.bench.timing import measure_interleaved
    from smlp_export.export.pipeline import export_model
    from smlp_export.runners.registry import get_runner

    from dense_baseline import export_dense_onnx

    threads = _common.setup_threads(args.threads)
    experts = [int(e) for e in args.experts.split(",")]
    if args.quick:
        experts = [e for e in experts if e in (4, 16, 64)] or experts
    cfg_t = _common.timing(args.quick)
    ids = real_token_ids(args.batch, args.seq)
    rows = []
    print(f"experts scaling: preset {args.preset}, B={args.batch} T={args.seq}, {threads} threads; "
          f"{short_description(describe_machine())}")
    sessions: dict[tuple[int, str], object] = {}
    with tempfile.TemporaryDirectory(prefix="smlp-experts-") as tmp:
        for E in experts:
            cfg = preset(args.preset, n_token_experts=E)
            torch.manual_seed(E)
            model = SMLPForCausalLM(cfg).eval()
            ckpt = Path(tmp) / f"E{E}"
            save_checkpoint(model, ckpt, metadata={"kind": "random-init", "benchmark": "experts_scaling"})
            routing: dict = {}
            with torch.inference_mode():
                want = model(torch.from_numpy(ids), routing).numpy()
            # Why latency can grow with E at fixed active parameters per *token*: a batch of B*T tokens
            # spreads over up to min(E, B*T) experts, and every expert used is one more weight matrix
            # read from memory. Record how many were used and how many bytes that is.
            per_expert_bytes = (2 * cfg.d_model * cfg.d_expert + cfg.d_expert + cfg.d_model) * 4
            used = {name: int(torch.unique(lg.argmax(-1)).numel()) for name, lg in routing.items() if name.endswith("tmoe")}
            graphs = {}
            for target in ("ort", "portable"):
                res = export_model(str(ckpt), Path(tmp) / f"E{E}-{target}", target=target, validate=False)
                graphs[target] = Path(res.out_dir) / MODEL_FILE
            graphs["dense (baseline)"] = export_dense_onnx(ckpt, Path(tmp) / f"E{E}-dense.onnx")
            row = {"experts": E, "active_params": model.num_active_parameters(), "params": model.num_parameters(),
                   "experts_used_per_layer": used,
                   "expert_weight_mb_read": round(sum(used.values()) * per_expert_bytes / 1e6, 2)}
            for name, path in graphs.items():
                r = get_runner("ort", path, intra_op_threads=threads)
                r.load()
                diff = float(np.abs(r.run(ids)["logits"] - want).max())
                if diff > PARITY_ATOL:
                    raise SystemExit(f"E={E} {name}: logits differ from PyTorch by {diff:.2e} > {PARITY_ATOL}")
                row[name] = {"max_abs_diff_vs_torch": diff}
                sessions[(E, name)] = r
            rows.append(row)
            print(f"E={E:<3} exported and checked; experts used {sum(used.values()):>3} "
                  f"({row['expert_weight_mb_read']:6.1f} MB of expert weights per batch)")
        # All graphs timed side by side (rounds), so every point sees the same machine load.
        print(f"timing {len(sessions)} graphs side by side ...")
        stats = measure_interleaved({k: (lambda r=r: r.run(ids)) for k, r in sessions.items()}, cfg_t)
        for row in rows:
            for name in ("ort", "portable", "dense (baseline)"):
                st = stats[(row["experts"], name)]
                if isinstance(st, Exception):
                    raise SystemExit(f"E={row['experts']} {name} failed: {st}")
                row[name].update(st.to_dict())
            print(f"E={row['experts']:<3} " + "  ".join(
                f"{n} p50 {row[n]['p50_ms']:8.2f} ms (spread {row[n]['spread_pct']:3.0f}%)"
                for n in ("ort", "portable", "dense (baseline)")))
    names = ["ort", "portable", "dense (baseline)"]
    first, last = rows[0], rows[-1]
    ratios = {n: last[n]["p50_ms"] / first[n]["p50_ms"] for n in names}
    print(f"p50(E={last['experts']}) / p50(E={first['experts']}): "
          + ", ".join(f"{n} {v:.2f}x" for n, v in ratios.items()))
    goals = [_common.goal_line(f"{n}: p50(E={last['experts']})/p50(E={first['experts']})", ratios[n], GOAL_RATIO)
             for n in ("ort", "portable")]
    machine = describe_machine()
    payload = {"config": {"preset": args.preset, "batch": args.batch, "seq": args.seq, "threads": threads,
                          "timing": cfg_t.to_dict(), "parity_atol": PARITY_ATOL},
               "rows": rows, "ratios_last_over_first": ratios, "goals": goals}
    out = _common.save("experts_scaling", args, payload, machine)
    if not args.no_plot:
        plot(rows, names, out.with_suffix(".png"),
             f"B={args.batch} T={args.seq}; {short_description(machine)}")


def plot(rows, names, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from smlp_export.bench.report import atomic_write

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [r["experts"] for r in rows]
    for n in names:
        ax.plot(xs, [r[n]["p50_ms"] for r in rows], marker="o", linestyle="--" if "baseline" in n else "-", label=n)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("token experts E (same active parameters per token)")
    ax.set_ylabel("p50 latency (ms), ONNX Runtime CPU")
    ax.set_title(title, fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
