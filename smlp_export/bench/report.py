"""Benchmark outputs: a readable table, a JSON report, a PNG plot. Files are written atomically
(temp file in the same folder, then rename) so a failed run never leaves half a report."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from ..fsutil import set_default_mode

REPORT_FORMAT = 1


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename tmp_path onto ``path`` (same folder, same filesystem)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        set_default_mode(tmp)  # mkstemp made it 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def make_report(rows: list[dict[str, Any]], machine: dict[str, Any], settings: dict[str, Any],
                **extra: Any) -> dict[str, Any]:
    return {"format_version": REPORT_FORMAT, "machine": machine, "settings": settings, "rows": rows, **extra}


def write_json(report: dict[str, Any], path: str | os.PathLike) -> None:
    text = json.dumps(report, indent=2, sort_keys=False) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def format_table(rows: list[dict[str, Any]]) -> str:
    """One line per (backend, target, batch, seq): p50/p90/p99, mean, tokens/s, spread; skipped
    and failed rows show their reason."""
    head = (f"{'backend':<16}{'target':<10}{'dtype':<8}{'B':>4}{'T':>6}{'p50 ms':>10}{'p90 ms':>10}"
            f"{'p99 ms':>10}{'mean ms':>10}{'tok/s':>11}{'spread':>8}{'runs':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        left = (f"{r.get('backend', ''):<16}{str(r.get('target') or '-'):<10}{str(r.get('dtype') or '-'):<8}"
                f"{_fmt(r.get('batch'), '>4d')}{_fmt(r.get('seq'), '>6d')}")
        if r.get("status") != "ok":
            lines.append(f"{left}  {r.get('status', '?')}: {r.get('reason', '')}")
            continue
        lines.append(f"{left}{r['p50_ms']:>10.3f}{r['p90_ms']:>10.3f}{r['p99_ms']:>10.3f}{r['mean_ms']:>10.3f}"
                     f"{r['tokens_per_s']:>11.0f}{r['spread_pct']:>7.0f}%{r['runs']:>6d}")
    return "\n".join(lines)


def write_plot(rows: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> None:
    """p50 latency vs sequence length, one line per backend/target, one panel per batch size
    (error bars p10..p90). Needs matplotlib (Agg backend: no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise ValueError("nothing to plot: no successful rows")
    batches = sorted({r["batch"] for r in ok})
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, b in zip(axes[0], batches):
        series: dict[str, list[dict[str, Any]]] = {}
        for r in ok:
            if r["batch"] == b:
                label = r["backend"] if not r.get("target") else f"{r['backend']} ({r['target']})"
                series.setdefault(label, []).append(r)
        for label, rs in sorted(series.items()):
            rs.sort(key=lambda r: r["seq"])
            xs = [r["seq"] for r in rs]
            ys = [r["p50_ms"] for r in rs]
            err = [[r["p50_ms"] - r["p10_ms"] for r in rs], [r["p90_ms"] - r["p50_ms"] for r in rs]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel("p50 latency (ms)")
        ax.set_title(f"batch {b}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
