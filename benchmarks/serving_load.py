"""Serving under load: a real local tritonserver, dynamic batching on vs off, 1..16 concurrent clients.

Exports a checkpoint (default: the embedded model, ``--target ort``), writes two python-backend
Triton repositories with ``smlp deploy``'s library call, one with dynamic batching (max_batch_size
8, the default) and one without (max_batch_size 0), and runs ``check_repository`` on each: the
exactness cases, the bad-input cases and a load sweep in which each client sends held-out requests of
mixed lengths (max_seq_len, /2, /4, 16, 5, 1 tokens) back to back for ``--duration`` seconds; every
response is compared with the export run in-process (mismatches). The two configurations alternate
for ``--rounds`` rounds (load drift on a shared machine hits both alike); the table reports per
configuration and concurrency the round with the median throughput.

The client threads run on the same machine as the server (2 cores here), so the figures include the
client's own CPU use: read them as ratios measured side by side, not as server capacity.

Goal (issue 13), reported, never asserted: with batching, throughput at 16 clients > at 1 client.
"""
from __future__ import annotations

import atexit
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the embedded model)")
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    p.add_argument("--duration", type=float, default=None, help="seconds per concurrency (default 8, quick 2)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of (batching, no batching) (default 3, quick 1)")
    args = p.parse_args()

    from smlp_export import load_checkpoint
    from smlp_export.bench.machine import describe_machine
    from smlp_export.deploy import write_triton_repository
    from smlp_export.deploy.load import parse_concurrency, table_lines
    from smlp_export.deploy.server import check_repository
    from smlp_export.export.pipeline import export_model

    conc = parse_concurrency(args.concurrency)
    duration = args.duration or (2.0 if args.quick else 8.0)
    rounds = args.rounds or (1 if args.quick else 3)
    model = load_checkpoint(args.checkpoint)
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    print(f"exporting to {tmp} ...", flush=True)
    export_model(model, tmp / "out", target="ort", validate=True, quick=True, force=True)
    configs = {"batching": 8, "no batching": 0}
    records = {label: write_triton_repository(tmp / "out", tmp / f"repo-{mb}", backend="python", max_batch_size=mb)
               for label, mb in configs.items()}

    runs: dict[str, list[list[dict]]] = {label: [] for label in configs}
    checks = {}
    for r in range(rounds):
        for label, mb in configs.items():
            print(f"round {r + 1}/{rounds}: {label}", flush=True)
            res = check_repository(tmp / f"repo-{mb}", tmp / "out", concurrency=conc, duration_s=duration,
                                   progress=lambda msg: print(f"  {msg}", flush=True))
            runs[label].append(res["load"])
            checks.setdefault(label, []).append({k: res[k] for k in ("passed", "max_err_rel", "bound")})

    rows = []
    for label in configs:
        for i, c in enumerate(conc):
            per_round = sorted((rnd[i] for rnd in runs[label]), key=lambda row: row["throughput_per_s"])
            med = per_round[len(per_round) // 2]
            rows.append({"config": label, **med,
                         "throughput_rounds": [row["throughput_per_s"] for row in per_round]})
    for label in configs:
        print(f"\n{label}:")
        print("\n".join(table_lines([r for r in rows if r["config"] == label])))

    def tput(label: str, c: int) -> float:
        return next(r["throughput_per_s"] for r in rows if r["config"] == label and r["concurrency"] == c)

    lo, hi = min(conc), max(conc)
    goals = [_common.goal_line(f"batching: throughput at {hi} clients / at {lo} client", tput("batching", hi) /
                               tput("batching", lo), 1.0, ">=")]
    print(f"batching on / off at {hi} clients: {tput('batching', hi) / tput('no batching', hi):.2f}x")
    clean = all(r["errors"] == 0 and r["mismatches"] == 0 for r in rows)
    print(f"errors and mismatches: {'none' if clean else 'SOME: see the JSON'}; all checks passed: "
          f"{all(c['passed'] for cs in checks.values() for c in cs)}")
    _common.save("serving_load", args, {
        "config": {"concurrency": conc, "duration_s": duration, "rounds": rounds, "backend": "python",
                   "max_batch_size": configs, "queue_delay_us": records["batching"]["queue_delay_us"],
                   "preferred_batch_sizes": records["batching"]["preferred_batch_sizes"], "pool_lengths": "max_seq_len, /2, /4, 16, 5, 1 (2 windows each)"},
        "rows": rows, "checks": checks, "goals": goals,
        "ratios": {"batching_hi_over_lo": tput("batching", hi) / tput("batching", lo),
                   "batching_on_over_off_at_hi": tput("batching", hi) / tput("no batching", hi)},
    }, describe_machine())


if __name__ == "__main__":
    main()
