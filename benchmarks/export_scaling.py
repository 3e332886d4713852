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


def timed(cmd: list[str], record: Path, env: dict | None = None) -> tuple[dict, str]:
    """Run ``cmd`` under /usr/bin/time -v (report kept in ``record``); returns (figures, stdout)."""
    load = os.getloadavg()[0]
    p = subprocess.run([TIME, "-v", "-o", str(record), *cmd], capture_output=True, text=True, env=env)
    fig = parse_time_v(record.read_text())
    fig["load_avg_1m_before"] = round(load, 2)
    if p.returncode != 0:
        fig["error"] = (p.stderr.strip().splitlines() or ["?"])[-1]
    return fig, p.stdout


def run_size(name: str, work: Path, keep: bool) -> dict:
    from smlp_export.config import preset
    from smlp_export.memory import estimate, largest_tensor_numel, num_parameters

    cfg = preset(name)
    ckpt, out = work / f"ckpt-{name}", work / f"out-{name}"
    row: dict = {"preset": name, "parameters": num_parameters(cfg), "config": cfg.to_dict(),
                 "largest_tensor_bytes": 4 * largest_tensor_numel(cfg),
                 "estimate_export_bytes": estimate(cfg, "export"),
                 "estimate_export_validate_bytes": estimate(cfg, "export+validate")}
    init_rec = work / f"init-{name}.time"
    if not (ckpt / "model.safetensors").is_file():
        print(f"[{name}] smlp init", flush=True)
        fig, _ = timed([*_smlp(), "init", "--preset", name, "--seed", "0", "-o", str(ckpt), "--force"], init_rec)
        if "error" in fig:
            return {**row, "init": fig}
    row["init"] = parse_time_v(init_rec.read_text()) if init_rec.exists() else None
    row["weight_bytes"] = (ckpt / "model.safetensors").stat().st_size
    for key, extra in (("export_no_validate", ["--no-validate"]), ("export_quick", ["--quick"])):
        print(f"[{name}] smlp export {' '.join(extra)}", flush=True)
        fig, stdout = timed([*_smlp(), "export", str(ckpt), "-o", str(out), "--target", "ort", "--force",
                             "--json", *extra], work / f"{key}-{name}.time")
        try:
            res = json.loads(stdout)
            fig.update(parity=res["parity"], stage_seconds=res["stage_seconds"], model_bytes=res["model_bytes"])
            fig["files"] = json.loads((out / "manifest.json").read_text())["files"]
        except (json.JSONDecodeError, KeyError, FileNotFoundError):
            fig.setdefault("error", "no JSON summary")
        fig["rss_over_weights"] = round(fig["peak_rss_bytes"] / row["weight_bytes"], 3) if fig["peak_rss_bytes"] else None
        print(f"[{name}] {key}: peak RSS {fig['peak_rss_bytes'] / 1e9:.2f} GB "
              f"({fig['rss_over_weights']}x the {row['weight_bytes'] / 1e9:.2f} GB of weights), "
              f"{fig['wall_s']:.0f} s, parity {fig.get('parity', fig.get('error'))}", flush=True)
        row[key] = fig
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return row


def goals(rows: list[dict]) -> list[dict]:
    big = [r for r in rows if r.get("weight_bytes", 0) >= GiB and "export_quick" in r]
    out = []
    for r in big:
        w = r["weight_bytes"]
        nv, q = r["export_no_validate"], r["export_quick"]
        if nv.get("peak_rss_bytes"):
            out.append(_common.goal_line(f"{r['preset']}: export peak RSS / weight bytes (no validation)",
                                         nv["peak_rss_bytes"] / w, 1.5))
        if q.get("peak_rss_bytes"):
            out.append(_common.goal_line(f"{r['preset']}: --quick peak RSS / (2.5 x weights + 1 GiB)",
                                         q["peak_rss_bytes"] / (2.5 * w + GiB), 1.0))
    if len(big) >= 2:
        per_gb = [r["export_no_validate"]["wall_s"] / (r["weight_bytes"] / 1e9) for r in (big[0], big[-1])]
        out.append(_common.goal_line(f"seconds per GB, {big[-1]['preset']} / {big[0]['preset']} (no validation)",
                                     per_gb[1] / per_gb[0], 1.5))
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "export_quick" in r]
    w = [r["weight_bytes"] / 1e9 for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, marker in (("export_no_validate", "export (no validation)", "o"),
                               ("export_quick", "export + --quick parity", "s")):
        a.plot(w, [r[key]["peak_rss_bytes"] / 1e9 for r in rows], marker=marker, label=label)
        b.plot(w, [r[key]["wall_s"] for r in rows], marker=marker, label=label)
    xs = [0, max(w) * 1.05]
    a.plot(xs, [1.5 * x for x in xs], "--", color="gray", label="1.5 x weights")
    a.plot(xs, [2.5 * x + GiB / 1e9 for x in xs], ":", color="gray", label="2.5 x weights + 1 GiB")
    for r, x in zip(rows, w):
        a.annotate(r["preset"], (x, r["export_quick"]["peak_rss_bytes"] / 1e9), textcoords="offset points",
                   xytext=(4, 4), fontsize=8)
    a.set(xlabel="checkpoint weights (GB, float32)", ylabel="peak RSS (GB)", title="Peak memory of smlp export")
    b.set(xlabel="checkpoint weights (GB, float32)", ylabel="wall time (s)", title="Wall time (shared 2-core machine)")
    a.legend(fontsize=8)
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main() -> None:
    p = _common.parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=",".join(SIZES), help=f"presets to run (default {','.join(SIZES)})")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/smlp-export-scaling"),
                   help="checkpoints and exports (needs ~3x the largest model's weights of disk)")
    p.add_argument("--keep", action="store_true", help="keep the exports (checkpoints are always kept)")
    args = p.parse_args()
    from smlp_export.bench.machine import describe_machine

    if not Path(TIME).exists():
        sys.exit(f"{TIME} (GNU time) is needed to measure peak RSS")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows: list[dict] = []
    for s in sizes:  # the JSON is rewritten after each size, so a long run leaves its figures so far
        rows.append(run_size(s, args.workdir, args.keep))
        payload = {"config": {"sizes": sizes, "target": "ort", "dtype": "fp32", "workdir": str(args.workdir),
                              "time_tool": f"{TIME} -v", "checkpoint_dtype": "float32"},
                   "complete": len(rows) == len(sizes), "rows": rows, "goals": goals(rows),
                   "total_s": round(time.time() - t0, 1)}
        out = _common.save("export_scaling", args, payload, describe_machine())
        if not args.no_plot:
            plot(rows, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
