"""Benchmark 1: the exported model on ONNX Runtime CPU against PyTorch eager and torch.compile.

Default checkpoint (or --checkpoint), B in {1, 8}, T in {64, max_seq_len}, real held-out token
ids, all backends timed in this one run with the same thread count. Goals (reported, not asserted):
ort p50 <= 0.5 x PyTorch eager p50 at B=1, and ort no slower than torch.compile anywhere.
``ort-portable`` is timed alongside for information.
Run: ``python benchmarks/exported_vs_eager.py [--quick] [--checkpoint CKPT] [--profile]``.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

GOAL_EAGER_B1 = 0.5
GOAL_COMPILE = 1.0


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--seq", default=None, help="default: 64,max_seq_len")
    p.add_argument("--backends", default="torch,torch-compile,ort,ort-portable")
    p.add_argument("--profile", action="store_true", help="also profile the ort graph (ORT profiler) at B=1")
    args = p.parse_args()

    from smlp_export.bench.backends import Source, parse_backends
    from smlp_export.bench.machine import describe_machine, short_description
    from smlp_export.bench.report import format_table, write_plot
    from smlp_export.bench.sweep import _corpus_of, ratio_table, real_token_ids, run_sweep

    threads = _common.setup_threads(args.threads)
    src = Source.resolve(args.checkpoint)
    batches = [int(b) for b in args.batch.split(",")]
    seqs = [int(t) for t in args.seq.split(",")] if args.seq else sorted({64, src.max_seq_len})
    timing = _common.timing(args.quick)
    print(f"exported vs eager: {args.checkpoint or 'default checkpoint'}, B={batches} T={seqs}, {threads} threads")
    profile = None
    with tempfile.TemporaryDirectory(prefix="smlp-evse-") as work:
        rows = run_sweep(src, parse_backends(args.backends), batches, seqs, timing, threads,
                         progress=True, workdir=Path(work))
        if args.profile and ("ort", "fp32") in src.onnx:
            from smlp_export.bench.profile import format_profile, profile_onnx

            profile = profile_onnx(src.onnx[("ort", "fp32")], real_token_ids(1, max(seqs), _corpus_of(src)),
                                   runs=20, intra_op_threads=threads)
            print(format_profile(profile))
    machine = describe_machine()
    print(f"machine: {short_description(machine)}")
    print(format_table(rows))
    vs_eager = ratio_table(rows, "ort", "torch")
    vs_compile = ratio_table(rows, "ort", "torch-compile")
    portable_vs_eager = ratio_table(rows, "ort-portable", "torch")
    print(f"{'B':>3}{'T':>6}{'ort/eager':>12}{'ort/compile':>13}{'portable/eager':>16}")
    for r in vs_eager:
        c = next((x["ratio_p50"] for x in vs_compile if (x["batch"], x["seq"]) == (r["batch"], r["seq"])), None)
        q = next((x["ratio_p50"] for x in portable_vs_eager if (x["batch"], x["seq"]) == (r["batch"], r["seq"])), None)
        print(f"{r['batch']:>3}{r['seq']:>6}{r['ratio_p50']:>12.2f}"
              f"{c if c is not None else float('nan'):>13.2f}{q if q is not None else float('nan'):>16.2f}")
    goals = []
    b1 = [r["ratio_p50"] for r in vs_eager if r["batch"] == 1]
    if b1:
        goals.append(_common.goal_line("ort/eager p50 at B=1 (worst T)", max(b1), GOAL_EAGER_B1))
    if vs_compile:
        goals.append(_common.goal_line("ort/torch.compile p50 (worst case)",
                                       max(r["ratio_p50"] for r in vs_compile), GOAL_COMPILE))
    if not goals:
        print("goals: not evaluated (a backend was skipped; see the table)")
    payload = {"config": {"checkpoint": args.checkpoint or "default", "batch": batches, "seq": seqs,
                          "threads": threads, "timing": timing.to_dict()},
               "rows": rows, "ratios": {"ort_over_eager": vs_eager, "ort_over_compile": vs_compile,
                                        "portable_over_eager": portable_vs_eager},
               "goals": goals, "profile": profile}
    out = _common.save("exported_vs_eager", args, payload, machine)
    if not args.no_plot and any(r["status"] == "ok" for r in rows):
        write_plot(rows, out.with_suffix(".png"), title=short_description(machine))
        print(f"wrote {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
