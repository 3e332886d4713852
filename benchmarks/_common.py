"""Shared plumbing for the benchmark scripts: options, timing presets, machine record, outputs.

Scripts print their figures and ratios measured side by side in one run, and write JSON (+ PNG)
under benchmarks/results/. Nothing here asserts a speed: goals are reported as met / missed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="short timings and fewer cases (smoke run)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: usable cores)")
    p.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/results/<name>.json)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    return p


def timing(quick: bool):
    from smlp_export.bench.timing import TimingConfig

    return TimingConfig.quick() if quick else TimingConfig(warmup=3, min_runs=10, min_time_s=1.0, max_time_s=20.0)


def setup_threads(threads: int | None) -> int:
    import torch

    n = threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(n)
    return n


def save(name: str, args: argparse.Namespace, payload: dict[str, Any], machine: dict[str, Any]) -> Path:
    from smlp_export.bench.report import write_json

    out = args.out or RESULTS / f"{name}.json"
    report = {"benchmark": name, "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "quick": args.quick, "machine": machine, **payload}
    write_json(report, out)
    print(f"wrote {out}")
    return out


def goal_line(name: str, value: float, limit: float, op: str = "<=") -> dict[str, Any]:
    met = value <= limit if op == "<=" else value >= limit
    print(f"goal {name}: {value:.3f} {op} {limit} -> {'MET' if met else 'MISSED'}"
          + ("" if met else f" (by {abs(value / limit - 1) * 100:.0f}%)"))
    return {"goal": name, "value": value, "limit": limit, "op": op, "met": met}
