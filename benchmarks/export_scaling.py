"""Export cost vs model size: peak memory, wall time and parity of `smlp export` from 3 M to >= 1.5 B.

For each size (presets ``tiny`` ~3.2 M, ``100m``, ``350m``, ``1.5b``; random init, float32
checkpoints) this runs, each in its own process under ``/usr/bin/time -v``:

1. ``smlp init --preset P --seed 0`` (skipped when the work folder already holds that checkpoint;
   its earlier ``init-P.time`` record is then reused);
2. ``smlp export CKPT --target ort --no-validate`` (trace + translate + save);
3. ``smlp export CKPT --target ort --quick`` (the same, then quick parity against PyTorch on
   held-out text).

and records the peak resident set size ("Maximum resident set size"), the wall time, the
export's own stage times and the parity verdict, next to the weight bytes of the checkpoint and
``smlp_export.memory.estimate`` for the same config. Runs go one at a time (memory figures of one
process at a time); the load average before each run is recorded, because the machine is shared.

Goals (issue 10), reported as met / missed, never asserted, for the models whose weights are at
least 1 GiB (below that the interpreter and libraries, ~0.3-0.6 GB, dominate any ratio):
- peak RSS of the export without validation <= 1.5 x the checkpoint's weight bytes;
- peak RSS with --quick validation <= 2.5 x the weight bytes + 1 GiB;
- wall time linear in the weight bytes: seconds per GB of the largest model <= 1.5 x that of the
  smallest such model (export without validation).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from smlp_export.artifacts import MANIFEST_FILE, PARITY_FILE  # noqa: E402

GiB = 1024**3
SIZES = ("tiny", "100m", "350m", "1.5b")
TIME = "/usr/bin/time"


def _smlp() -> list[str]:
    exe = Path(sys.executable).with_name("smlp")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "smlp_cli.main"]


def parse_time_v(text: str) -> dict:
    """Peak RSS (bytes) and wall seconds from GNU time's ``-v`` report."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    secs = None
    if wall:
        parts = [float(x) for x in wall.group(1).split(":")]
        secs = sum(p * 60 ** i for i, p in enumerate(reversed(parts)))
    return {"peak_rss_bytes": int(rss.group(1)) * 1024 if rss else None, "wall_s": secs,
            "exit_status": int(status.group(1)) if status else None}


def timed(cmd: list[str], record: Path, env: dict | None = None, reuse: bool = False) -> tuple[dict, str]:
    """Run ``cmd`` under /usr/bin/time -v (report kept in ``record``, stdout in ``record.out``,
    stderr in ``record.err``, the command line in ``record.cmd``); returns (figures, stdout).
    reuse: a finished earlier run of the same record (its .time / .out / .err) is read, not rerun
    (the paper-scale runs take an hour on the shared 2-core machine)."""
    out, err, cmdf = (record.with_suffix(record.suffix + s) for s in (".out", ".err", ".cmd"))
    if reuse and record.is_file() and record.stat().st_size and out.is_file():
        fig = parse_time_v(record.read_text())
        fig["reused_record"] = str(record)
        if cmdf.is_file():
            fig["command"] = cmdf.read_text().strip()
        if fig.get("exit_status"):
            fig["error"] = ((err.read_text().strip().splitlines() if err.is_file() else []) or ["?"])[-1]
        return fig, out.read_text()
    load = os.getloadavg()[0]
    cmdf.write_text(" ".join(cmd) + "\n")
    p = subprocess.run(["nice", "-n", "5", TIME, "-v", "-o", str(record), *cmd], capture_output=True, text=True,
                       env=env)
    out.write_text(p.stdout)
    err.write_text(p.stderr)
    fig = parse_time_v(record.read_text())
    fig["load_avg_1m_before"] = round(load, 2)
    fig["command"] = " ".join(cmd)
    if p.returncode != 0:
        fig["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
    return fig, p.stdout


def run_size(name: str, work: Path, keep: bool, dtype: str = "fp32", quick: bool = True,
             reuse: bool = False) -> dict:
    """One preset: init (``dtype`` checkpoint), export without validation, export with --quick
    (unless ``quick`` is False: a model whose validation cannot fit here)."""
    from smlp_export.config import preset
    from smlp_export.memory import DTYPE_BYTES, estimate, largest_tensor_numel, num_parameters

    cfg = preset(name)
    tag = name if dtype == "fp32" else f"{name}-{dtype}"
    ckpt, out = work / f"ckpt-{tag}", work / f"out-{tag}"
    row: dict = {"preset": name, "checkpoint_dtype": dtype, "parameters": num_parameters(cfg), "config": cfg.to_dict(),
                 "largest_tensor_bytes": DTYPE_BYTES[dtype] * largest_tensor_numel(cfg),
                 "estimate_export_bytes": estimate(cfg, "export", dtype=dtype, checkpoint_dtype=dtype),
                 "estimate_export_validate_bytes": estimate(cfg, "export+validate", dtype=dtype,
                                                            checkpoint_dtype=dtype),
                 "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    init_rec = work / f"init-{tag}.time"
    if not (ckpt / "model.safetensors").is_file():
        print(f"[{tag}] smlp init", flush=True)
        fig, _ = timed([*_smlp(), "init", "--preset", name, "--dtype", dtype, "--seed", "0", "-o", str(ckpt),
                        "--force"], init_rec)
        if "error" in fig:
            return {**row, "init": fig}
    row["init"] = parse_time_v(init_rec.read_text()) if init_rec.exists() and init_rec.stat().st_size else None
    row["weight_bytes"] = (ckpt / "model.safetensors").stat().st_size
    if row["init"] and row["init"].get("peak_rss_bytes"):
        row["init"]["rss_over_weights"] = round(row["init"]["peak_rss_bytes"] / row["weight_bytes"], 3)
    steps = [("export_no_validate", ["--no-validate"])] + ([("export_quick", ["--quick"])] if quick else [])
    for key, extra in steps:
        print(f"[{tag}] smlp export {' '.join(extra)}", flush=True)
        fig, stdout = timed([*_smlp(), "export", str(ckpt), "-o", str(out), "--target", "ort", "--force",
                             "--json", *extra], work / f"{key}-{tag}.time", reuse=reuse)
        try:
            res = json.loads(stdout)
            fig.update(parity=res["parity"], stage_seconds=res["stage_seconds"], model_bytes=res["model_bytes"],
                       export_dtype=res["dtype"])
            if (out / MANIFEST_FILE).is_file():
                fig["files"] = json.loads((out / MANIFEST_FILE).read_text())["files"]
            kept = work / f"parity-{tag}.json"  # kept after the export folder is removed
            if key == "export_quick" and (out / PARITY_FILE).is_file() and not fig.get("reused_record"):
                shutil.copyfile(out / PARITY_FILE, kept)
            if key == "export_quick" and kept.is_file():
                fig["coverage"] = _coverage_summary(json.loads(kept.read_text()))
        except (json.JSONDecodeError, KeyError, FileNotFoundError):
            fig.setdefault("error", "no JSON summary")
        w = row["weight_bytes"]
        fig["rss_over_weights"] = round(fig["peak_rss_bytes"] / w, 3) if fig.get("peak_rss_bytes") else None
        fig["s_per_gb"] = round(fig["wall_s"] / (w / 1e9), 2) if fig.get("wall_s") else None
        print(f"[{tag}] {key}: peak RSS {(fig.get('peak_rss_bytes') or 0) / 1e9:.2f} GB "
              f"({fig['rss_over_weights']}x the {w / 1e9:.2f} GB of weights), "
              f"{fig.get('wall_s') or 0:.0f} s, parity {fig.get('parity', fig.get('error'))}", flush=True)
        row[key] = fig
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def _coverage_summary(parity: dict) -> dict:
    """Experts routed by validation inputs, and those verified directly (validate/unreached.py)."""
    cov = parity.get("coverage") or {}
    exp = cov.get("experts") or {}
    direct = {layer: sorted(int(e) for e, r in recs.items() if r.get("ok"))
              for layer, recs in (cov.get("unreached") or {}).items()}
    return {"experts_hit": exp.get("experts_hit"), "experts": exp.get("experts"),
            "verified_directly": {k: v for k, v in direct.items() if v}}


def goals(rows: list[dict]) -> list[dict]:
    big = [r for r in rows if r.get("weight_bytes", 0) >= GiB and "export_no_validate" in r]
    out = []
    for r in big:
        w = r["weight_bytes"]
        label = r["preset"] + ("" if r.get("checkpoint_dtype", "fp32") == "fp32" else f" {r['checkpoint_dtype']}")
        nv, q = r["export_no_validate"], r.get("export_quick") or {}
        if nv.get("peak_rss_bytes"):
            out.append(_common.goal_line(f"{label}: export peak RSS / weight bytes (no validation)",
                                         nv["peak_rss_bytes"] / w, 1.5))
        if q.get("peak_rss_bytes"):  # issue 21: validation never holds the model twice
            out.append(_common.goal_line(f"{label}: --quick peak RSS / (1.5 x weights + 1 GiB)",
                                         q["peak_rss_bytes"] / (1.5 * w + GiB), 1.0))
    fp32 = [r for r in big if r.get("checkpoint_dtype", "fp32") == "fp32" and r["export_no_validate"].get("wall_s")]
    if len(fp32) >= 2:
        per_gb = [r["export_no_validate"]["wall_s"] / (r["weight_bytes"] / 1e9) for r in (fp32[0], fp32[-1])]
        out.append(_common.goal_line(f"seconds per GB, {fp32[-1]['preset']} / {fp32[0]['preset']} (no validation)",
                                     per_gb[1] / per_gb[0], 1.5))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted([r for r in rows if r.get("export_no_validate", {}).get("peak_rss_bytes")],
                  key=lambda r: r["weight_bytes"])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, marker in (("export_no_validate", "export (no validation)", "o"),
                               ("export_quick", "export + --quick parity", "s")):
        pts = [(r["weight_bytes"] / 1e9, r[key]) for r in rows if (r.get(key) or {}).get("peak_rss_bytes")]
        a.plot([x for x, _ in pts], [f["peak_rss_bytes"] / 1e9 for _, f in pts], marker=marker, label=label)
        b.plot([x for x, _ in pts], [f["wall_s"] for _, f in pts], marker=marker, label=label)
    xs = [0, max(r["weight_bytes"] / 1e9 for r in rows) * 1.05]
    a.plot(xs, [1.5 * x for x in xs], "--", color="gray", label="1.5 x weights")
    a.plot(xs, [1.5 * x + GiB / 1e9 for x in xs], ":", color="gray", label="1.5 x weights + 1 GiB")
    for r in rows:
        f = r.get("export_quick") or r["export_no_validate"]
        tag = r["preset"] + ("" if r.get("checkpoint_dtype", "fp32") == "fp32" else f" {r['checkpoint_dtype']}")
        a.annotate(tag, (r["weight_bytes"] / 1e9, f["peak_rss_bytes"] / 1e9), textcoords="offset points",
                   xytext=(4, 4), fontsize=8)
    a.set(xlabel="checkpoint weights (GB, as stored)", ylabel="peak RSS (GB)", title="Peak memory of smlp export")
    b.set(xlabel="checkpoint weights (GB, as stored)", ylabel="wall time (s)",
          title="Wall time (shared 2-core machine)")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def _merge(old_rows: list[dict], new_rows: list[dict]) -> list[dict]:
    """Earlier rows of other (preset, checkpoint dtype) pairs kept, these replaced, by weight size."""
    key = lambda r: (r["preset"], r.get("checkpoint_dtype", "fp32"))  # noqa: E731
    new = {key(r) for r in new_rows}
    rows = [r for r in old_rows if key(r) not in new] + new_rows
    return sorted(rows, key=lambda r: r.get("weight_bytes") or 0)


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"presets to run (default {','.join(SIZES)})")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="checkpoint dtype of `smlp init` (the export follows it)")
    p.add_argument("--no-quick", default="", metavar="PRESETS",
                   help="presets exported without the --quick run (validation that cannot fit this machine)")
    p.add_argument("--reuse", action="store_true",
                   help="read finished runs' records from the work folder instead of rerunning them")
    p.add_argument("--append", action="store_true",
                   help="keep the earlier results' rows of other presets / dtypes (results JSON)")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/smlp-export-scaling"),
                   help="checkpoints and exports (needs ~3x the largest model's weights of disk)")
    p.add_argument("--keep", action="store_true", help="keep the exports (checkpoints are always kept)")
    args = p.parse_args()
    from smlp_export.bench.machine import describe_machine

    if not Path(TIME).exists():
        sys.exit(f"{TIME} (GNU time) is needed to measure peak RSS")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    no_quick = {s.strip() for s in args.no_quick.split(",") if s.strip()}
    args.workdir.mkdir(parents=True, exist_ok=True)
    previous: list[dict] = []
    prev_path = Path(__file__).resolve().parent / "results" / "export_scaling.json"
    if args.append and prev_path.is_file():
        previous = json.loads(prev_path.read_text()).get("rows", [])
    t0 = time.time()
    rows: list[dict] = []
    for s in sizes:  # the JSON is rewritten after each size, so a long run leaves its figures so far
        rows.append(run_size(s, args.workdir, args.keep, args.dtype, quick=s not in no_quick, reuse=args.reuse))
        merged = _merge(previous, rows)
        payload = {"config": {"sizes": sizes, "target": "ort", "dtype": args.dtype, "workdir": str(args.workdir),
                              "time_tool": f"{TIME} -v", "checkpoint_dtype": args.dtype,
                              "no_quick": sorted(no_quick), "appended_to_earlier_rows": bool(previous)},
                   "complete": len(rows) == len(sizes), "rows": merged, "goals": goals(merged),
                   "total_s": round(time.time() - t0, 1)}
        out = _common.save("export_scaling", args, payload, describe_machine())
        if not args.no_plot:
            plot(merged, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
