"""Where time goes in an ONNX Runtime session: per-op-type and per-node totals from ORT's profiler.

ORT (``SessionOptions.enable_profiling``) writes a chrome-trace JSON list; each executed kernel is
an event with ``cat == "Node"``, a name ending in ``_kernel_time``, ``dur`` in microseconds and
``args.op_name`` (the op type). Summing those per op type shows what dominates a slow export
(shape subgraphs, transposes, gathers that copy, the MoE node itself).
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class OpTime:
    name: str  # op type (or node name for the per-node table)
    calls: int
    total_ms: float
    pct: float


# Control-flow ops run subgraphs whose nodes ORT reports as events of their own (checked: the
# per-expert Gemm/Tanh of the portable export's Loop appear once per iteration). Their own event
# spans the body, so only their *self* time (span minus the body's kernels) is counted.
CONTAINERS = ("Loop", "If", "Scan")


def summarize_trace(events: list[dict[str, Any]], n_runs: int = 1) -> dict[str, Any]:
    """Per-op-type and per-node time from ORT trace events; times are per run (divided by n_runs).

    Loop/If/Scan are counted by self time (``"Loop (self)"``); their body nodes by op type, so the
    percentages add up to 100 without double counting (one level of nesting).
    Returns {"runs", "kernel_ms_per_run", "by_op_type": [OpTime...], "by_node": [OpTime...] (top 20)}.
    """
    kernels = [ev for ev in events
               if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time")]
    plain = [ev for ev in kernels if ev.get("args", {}).get("op_name") not in CONTAINERS]
    by_op: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    by_node: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in kernels:
        op = ev.get("args", {}).get("op_name", "?")
        node = ev["name"][: -len("_kernel_time")]
        dur_ms = float(ev.get("dur", 0)) / 1e3
        if op in CONTAINERS:
            t0, t1 = ev.get("ts", 0), ev.get("ts", 0) + ev.get("dur", 0)
            body = sum(float(e.get("dur", 0)) for e in plain if t0 <= e.get("ts", 0) and e.get("ts", 0) + e.get("dur", 0) <= t1)
            dur_ms = max(0.0, float(ev.get("dur", 0)) - body) / 1e3
            op = f"{op} (self)"
        by_op[op][0] += 1
        by_op[op][1] += dur_ms
        by_node[f"{node} ({op})"][0] += 1
        by_node[f"{node} ({op})"][1] += dur_ms
    total = sum(v[1] for v in by_op.values())

    def table(d: dict[str, list[float]], top: int | None) -> list[OpTime]:
        rows = sorted(d.items(), key=lambda kv: -kv[1][1])[:top]
        return [OpTime(k, int(v[0]) // n_runs, v[1] / n_runs, 100.0 * v[1] / total if total else 0.0)
                for k, v in rows]

    return {"runs": n_runs, "kernel_ms_per_run": total / n_runs,
            "by_op_type": [asdict(r) for r in table(by_op, None)],
            "by_node": [asdict(r) for r in table(by_node, 20)]}


def profile_onnx(path: str | os.PathLike, input_ids: np.ndarray, *, runs: int = 10, warmup: int = 3,
                 provider: str = "CPUExecutionProvider", intra_op_threads: int | None = None,
                 keep_trace: str | os.PathLike | None = None) -> dict[str, Any]:
    """Profile ``runs`` calls of the ONNX model on ``input_ids`` (after ``warmup`` calls, which are
    dropped from the summary). ``keep_trace``: where to copy ORT's raw trace (else it is deleted)."""
    from smlp_export.runners.ort_runner import OrtRunner

    with tempfile.TemporaryDirectory(prefix="smlp-prof-") as tmp:
        runner = OrtRunner(path, providers=[provider], intra_op_threads=intra_op_threads,
                           profile_prefix=str(Path(tmp) / "ort"))
        runner.load()
        for _ in range(warmup):
            runner.run(input_ids)
        for _ in range(runs):
            runner.run(input_ids)
        trace_path = Path(runner.end_profiling())
        events = json.loads(trace_path.read_text())
        # Drop warm-up (and session-initialisation) events: keep only the last `runs` model_run spans.
        spans = [e for e in events if e.get("name") == "model_run"]
        if len(spans) >= runs:
            t0 = spans[-runs]["ts"]
            events = [e for e in events if e.get("ts", 0) >= t0]
        summary = summarize_trace(events, runs)
        summary.update(model=str(path), provider=provider, batch=int(input_ids.shape[0]),
                       seq=int(input_ids.shape[1]), intra_op_threads=runner.intra_op_threads,
                       warmup_runs_dropped=warmup)
        if keep_trace:
            Path(keep_trace).write_bytes(trace_path.read_bytes())
            summary["trace"] = str(keep_trace)
        runner.close()
    return summary


def format_profile(summary: dict[str, Any], top: int = 12) -> str:
    """A readable per-op-type table (and the heaviest nodes)."""
    lines = [f"ORT profile: {summary.get('model', '')}  B={summary.get('batch')} T={summary.get('seq')}  "
             f"{summary['kernel_ms_per_run']:.3f} ms of kernels per run ({summary['runs']} runs)",
             f"{'op type':<28}{'calls/run':>10}{'ms/run':>10}{'%':>7}"]
    for r in summary["by_op_type"][:top]:
        lines.append(f"{r['name']:<28}{r['calls']:>10}{r['total_ms']:>10.3f}{r['pct']:>7.1f}")
    lines.append("heaviest nodes:")
    for r in summary["by_node"][:8]:
        lines.append(f"  {r['name'][:60]:<60}{r['total_ms']:>9.3f} ms {r['pct']:>5.1f}%")
    return "\n".join(lines)
